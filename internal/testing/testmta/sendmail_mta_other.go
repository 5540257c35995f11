//go:build !linux

package testmta

import (
	"errors"
	"syscall"
)

func sendmailSysProcAttr() (*syscall.SysProcAttr, error) {
	return nil, errors.New("the private Sendmail runs on Linux only (it needs a private UTS namespace)")
}

func groupMembers(pgid int) []int { return nil }
