package testmta

import (
	"os"
	"strconv"
	"strings"
	"syscall"
)

// sendmailSysProcAttr: its own process group (Stop kills what is left of
// it), a private UTS namespace (see startSendmail), and SIGKILL when the
// test binary dies before its cleanups run.
func sendmailSysProcAttr() (*syscall.SysProcAttr, error) {
	return &syscall.SysProcAttr{
		Setpgid:    true,
		Cloneflags: syscall.CLONE_NEWUTS,
		Pdeathsig:  syscall.SIGKILL,
	}, nil
}

// groupMembers returns the PIDs of the processes in process group pgid,
// zombies included.
func groupMembers(pgid int) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// pid (comm) state ppid pgrp ...; comm may contain spaces.
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		if f := strings.Fields(s[i+1:]); len(f) >= 3 && f[2] == strconv.Itoa(pgid) {
			pids = append(pids, pid)
		}
	}
	return pids
}
