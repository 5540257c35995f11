// Package testredis starts real Redis servers on loopback for tests: a
// single server (Start), a Sentinel set of one master, one replica and
// three sentinels (StartSentinel), and a three-master Cluster
// (StartCluster). Each server runs as a child process of the test with a
// private directory and no persistence, is waited for by polling PING
// (never a blind sleep), and is stopped by its PID when the test ends.
//
// redis-server must be installed; `make test` installs it. A missing
// binary fails the test: it is never skipped.
package testredis

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/testing/testnet"
	"github.com/policyd-mail/policyd/internal/testing/testsync"
)

// How long a server may take to answer PING after start, and to exit
// after SIGTERM before it is killed.
const (
	readyTimeout = 10 * time.Second
	stopTimeout  = 5 * time.Second
)

// Server is one running redis-server (or sentinel).
type Server struct {
	t    testing.TB
	bin  string
	dir  string
	port int
	conf []string // config directives, one "name value..." per entry
	// sentinel runs the server in sentinel mode, from a config file it
	// may rewrite.
	sentinel bool

	mu     sync.Mutex
	cmd    *exec.Cmd
	done   chan struct{}
	output *testsync.Buffer
}

// binary finds redis-server or fails the test.
func binary(t testing.TB) string {
	t.Helper()
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		t.Fatalf("testredis: redis-server not found (%v); `make test` installs it (scripts/install-deps.sh)", err)
	}
	return bin
}

// Start runs a redis-server on a free loopback port. extra holds more
// config directives, each "name value...", e.g. "maxmemory 10mb".
func Start(t testing.TB, extra ...string) *Server {
	t.Helper()
	return start(t, false, extra)
}

func start(t testing.TB, sentinel bool, extra []string) *Server {
	t.Helper()
	bin := binary(t)
	dir := t.TempDir()
	var lastErr error
	// A port found free can be taken by another process before the
	// server binds it: try a few.
	for range 5 {
		port, err := testnet.FreePort()
		if err != nil {
			t.Fatalf("testredis: %v", err)
		}
		s := &Server{t: t, bin: bin, dir: dir, port: port, sentinel: sentinel}
		s.conf = append([]string{
			"port " + strconv.Itoa(port),
			"bind 127.0.0.1",
			"dir " + strconv.Quote(dir),
			"daemonize no",
			"logfile \"\"",
		}, extra...)
		if !sentinel {
			// No 5s wait before a replica's first sync.
			s.conf = append(s.conf, `save ""`, "appendonly no", "enable-debug-command local", "repl-diskless-sync-delay 0")
		}
		if lastErr = s.run(); lastErr == nil {
			t.Cleanup(s.Stop)
			return s
		}
		if !strings.Contains(lastErr.Error(), "already in use") {
			break
		}
	}
	t.Fatalf("testredis: %v", lastErr)
	return nil
}

// run starts the process and waits until it answers PING.
func (s *Server) run() error {
	name := "redis.conf"
	if s.sentinel {
		name = "sentinel.conf"
	}
	conf := s.dir + string(os.PathSeparator) + name
	// A sentinel rewrites its file with what it learns; keep that on a
	// restart, as a real one would.
	if _, err := os.Stat(conf); err != nil || !s.sentinel {
		if err := os.WriteFile(conf, []byte(strings.Join(s.conf, "\n")+"\n"), 0o600); err != nil {
			return err
		}
	}
	args := []string{conf}
	if s.sentinel {
		args = append(args, "--sentinel")
	}
	cmd := exec.Command(s.bin, args...)
	cmd.Dir = s.dir
	out := &testsync.Buffer{}
	cmd.Stdout, cmd.Stderr = out, out
	cmd.SysProcAttr = sysProcAttr()
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("exec %s: %w", s.bin, err)
	}
	done := make(chan struct{})
	go func() {
		_ = cmd.Wait()
		close(done)
	}()
	s.mu.Lock()
	s.cmd, s.done, s.output = cmd, done, out
	s.mu.Unlock()

	deadline := time.Now().Add(readyTimeout)
	for {
		select {
		case <-done:
			return fmt.Errorf("redis-server on port %d exited at start:\n%s", s.port, testsync.Tail(out.String(), 20))
		default:
		}
		if reply, err := s.Do("PING"); err == nil && reply == "PONG" {
			return nil
		}
		if time.Now().After(deadline) {
			s.kill()
			return fmt.Errorf("redis-server on port %d did not answer PING within %v:\n%s", s.port, readyTimeout, testsync.Tail(out.String(), 20))
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Addr is the server's host:port.
func (s *Server) Addr() string { return net.JoinHostPort("127.0.0.1", strconv.Itoa(s.port)) }

// Port is the server's port.
func (s *Server) Port() int { return s.port }

// URL is the --store URL of the server, database 0.
func (s *Server) URL() string { return "redis://" + s.Addr() + "/0" }

// PID is the running server's process id, 0 when stopped.
func (s *Server) PID() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd == nil || s.cmd.Process == nil {
		return 0
	}
	return s.cmd.Process.Pid
}

// Stop ends the server (SIGTERM, SIGKILL if it lingers) and waits for it
// to exit. Stopping a stopped server does nothing.
func (s *Server) Stop() {
	s.mu.Lock()
	cmd, done := s.cmd, s.done
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-done:
	case <-time.After(stopTimeout):
		_ = cmd.Process.Kill()
		<-done
	}
}

// kill ends the server at once (an outage, not a shutdown).
func (s *Server) kill() {
	s.mu.Lock()
	cmd, done := s.cmd, s.done
	s.cmd = nil
	s.mu.Unlock()
	if cmd == nil {
		return
	}
	_ = cmd.Process.Kill()
	<-done
}

// Kill ends the server with SIGKILL, as a crash would.
func (s *Server) Kill() { s.kill() }

// Restart starts a stopped server again on the same port and directory
// (empty: nothing is persisted). It stops a running one first.
func (s *Server) Restart() {
	s.t.Helper()
	s.Stop()
	var err error
	// The port was ours a moment ago; give a lingering socket a few tries.
	for range 20 {
		if err = s.run(); err == nil || !strings.Contains(err.Error(), "already in use") {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err != nil {
		s.t.Fatalf("testredis: restart: %v", err)
	}
}

// Pause stops the process with SIGSTOP: connections stay open and
// nothing answers, like a hung server. Resume continues it.
func (s *Server) Pause() { s.signal(syscall.SIGSTOP) }

// Resume continues a paused server.
func (s *Server) Resume() { s.signal(syscall.SIGCONT) }

func (s *Server) signal(sig syscall.Signal) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.cmd != nil {
		_ = s.cmd.Process.Signal(sig)
	}
}

// Output is what the server has logged.
func (s *Server) Output() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.output == nil {
		return ""
	}
	return s.output.String()
}

// Do sends one command on a new connection and returns the reply as text:
// a status or bulk string as is, an integer in decimal, an array as its
// elements one per line (nested arrays flattened), nil as "". A Redis
// error reply is returned as an error. For test set-up and assertions;
// the code under test uses its own client.
func (s *Server) Do(args ...string) (string, error) {
	c, err := net.DialTimeout("tcp", s.Addr(), time.Second)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	var b bytes.Buffer
	fmt.Fprintf(&b, "*%d\r\n", len(args))
	for _, a := range args {
		fmt.Fprintf(&b, "$%d\r\n%s\r\n", len(a), a)
	}
	if _, err := c.Write(b.Bytes()); err != nil {
		return "", err
	}
	var lines []string
	if err := readReply(bufio.NewReader(c), &lines); err != nil {
		return "", err
	}
	return strings.Join(lines, "\n"), nil
}

// MustDo is Do failing the test on an error.
func (s *Server) MustDo(args ...string) string {
	s.t.Helper()
	r, err := s.Do(args...)
	if err != nil {
		s.t.Fatalf("testredis: %s on %s: %v", strings.Join(args, " "), s.Addr(), err)
	}
	return r
}

// readReply reads one RESP2 reply, appending its text to lines.
func readReply(r *bufio.Reader, lines *[]string) error {
	line, err := r.ReadString('\n')
	if err != nil {
		return err
	}
	line = strings.TrimSuffix(line, "\r\n")
	if line == "" {
		return errors.New("empty reply line")
	}
	body := line[1:]
	switch line[0] {
	case '+', ':':
		*lines = append(*lines, body)
	case '-':
		return errors.New(body)
	case '$':
		n, err := strconv.Atoi(body)
		if err != nil {
			return fmt.Errorf("bad bulk length %q", body)
		}
		if n < 0 {
			*lines = append(*lines, "")
			return nil
		}
		buf := make([]byte, n+2)
		if _, err := io.ReadFull(r, buf); err != nil {
			return err
		}
		*lines = append(*lines, string(buf[:n]))
	case '*':
		n, err := strconv.Atoi(body)
		if err != nil {
			return fmt.Errorf("bad array length %q", body)
		}
		for range n {
			if err := readReply(r, lines); err != nil {
				return err
			}
		}
	default:
		return fmt.Errorf("unexpected reply %q", line)
	}
	return nil
}

// Info returns one field of INFO (e.g. "role" in section "replication").
func (s *Server) Info(section, field string) string {
	for line := range strings.SplitSeq(s.MustDo("INFO", section), "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(line), field+":"); ok {
			return v
		}
	}
	return ""
}

// waitFor polls cond every 20ms until it holds or timeout passes.
func waitFor(timeout time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(20 * time.Millisecond)
	}
	return true
}
