package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"syscall"
)

// The baseline runs in a process of its own by default: policyd is a
// process apart from the load, and a server sharing the load's process
// skips the scheduling between processes that policyd pays for, which on
// a small machine is much of the cost of a round trip.

// serveBaseline is the child: it serves proto on a free loopback port,
// prints the address, and stops when its parent closes its stdin or
// signals it.
func serveBaseline(ctx context.Context, proto string, stdin io.Reader, stdout io.Writer) error {
	b, err := startBaseline(proto)
	if err != nil {
		return err
	}
	defer b.close()
	fmt.Fprintln(stdout, b.addr())
	gone := make(chan struct{})
	go func() {
		_, _ = io.Copy(io.Discard, stdin)
		close(gone)
	}()
	select {
	case <-ctx.Done():
	case <-gone:
	}
	return nil
}

// baselineProcess starts the child and returns its address and a stop.
func baselineProcess(proto string) (string, func(), error) {
	exe, err := os.Executable()
	if err != nil {
		return "", nil, fmt.Errorf("baseline process: %w", err)
	}
	cmd := exec.Command(exe, "-serve-baseline", "-proto", proto)
	cmd.Stderr = os.Stderr
	in, err := cmd.StdinPipe()
	if err != nil {
		return "", nil, fmt.Errorf("baseline process: %w", err)
	}
	out, err := cmd.StdoutPipe()
	if err != nil {
		return "", nil, fmt.Errorf("baseline process: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return "", nil, fmt.Errorf("baseline process: %w", err)
	}
	stop := func() {
		in.Close()
		_ = cmd.Process.Signal(syscall.SIGTERM)
		_ = cmd.Wait()
	}
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		stop()
		return "", nil, fmt.Errorf("baseline process did not start: %w", err)
	}
	return strings.TrimSpace(line), stop, nil
}
