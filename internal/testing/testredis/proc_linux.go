package testredis

import "syscall"

// sysProcAttr has the kernel kill a server whose test binary died before
// its cleanups ran, so no redis-server outlives a crashed test.
func sysProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
}
