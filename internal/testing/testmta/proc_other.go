//go:build !linux

package testmta

import "syscall"

// groupAlive reports whether any process is in process group pgid.
func groupAlive(pgid int) bool {
	return syscall.Kill(-pgid, 0) == nil
}
