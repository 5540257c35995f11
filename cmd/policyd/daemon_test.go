package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var binPath string

// TestMain builds the real binary once; the daemon tests run it as a
// separate process, as an operator would.
func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "policyd-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binPath = filepath.Join(dir, "policyd")
	out, err := exec.Command("go", "build", "-race", "-o", binPath, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "building policyd: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// logBuffer collects the daemon's stderr and lets a test wait for a line.
type logBuffer struct {
	mu   sync.Mutex
	b    strings.Builder
	cond *sync.Cond
}

func newLogBuffer() *logBuffer {
	l := &logBuffer{}
	l.cond = sync.NewCond(&l.mu)
	return l
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.b.Write(p)
	l.cond.Broadcast()
	return len(p), nil
}

func (l *logBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// waitFor blocks until the log holds n occurrences of s, or fails after 15s.
func (l *logBuffer) waitFor(t testing.TB, s string, n int) {
	t.Helper()
	timer := time.AfterFunc(15*time.Second, func() { l.mu.Lock(); l.cond.Broadcast(); l.mu.Unlock() })
	defer timer.Stop()
	deadline := time.Now().Add(15 * time.Second)
	l.mu.Lock()
	defer l.mu.Unlock()
	for strings.Count(l.b.String(), s) < n {
		if time.Now().After(deadline) {
			t.Fatalf("daemon never logged %q (%d times):\n%s", s, n, l.b.String())
		}
		l.cond.Wait()
	}
}

// proc is a running policyd process.
type proc struct {
	cmd    *exec.Cmd
	log    *logBuffer
	policy string
	milter string
	http   string
	done   chan error
}

// startDaemon runs policyd on ports the kernel picks (no port chosen ahead
// and raced for) and reads them from its start-up log. The milter
// listener is off unless args turn it on.
func startDaemon(t testing.TB, args ...string) *proc {
	t.Helper()
	d := &proc{log: newLogBuffer(), done: make(chan error, 1)}
	all := append([]string{"serve", "--policy-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0", "--milter-listen", ""}, args...)
	d.cmd = exec.Command(binPath, all...)
	d.cmd.Stderr = d.log
	d.cmd.Dir = t.TempDir()
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.done <- d.cmd.Wait() }()
	t.Cleanup(func() {
		// Stop it by its PID if the test did not.
		_ = d.cmd.Process.Kill()
		<-d.done
		if t.Failed() {
			t.Logf("daemon log:\n%s", d.log.String())
		}
	})
	// Matches the line in either log format: msg="..." or "msg":"...".
	d.log.waitFor(t, `"http listening"`, 1)
	d.policy = d.log.listenAddr("policy delegation listening")
	d.milter = d.log.listenAddr("milter listening")
	d.http = d.log.listenAddr("http listening")
	return d
}

// listenAddr finds the addr of the log line whose message is msg, in the
// text or the JSON log format.
func (l *logBuffer) listenAddr(msg string) string {
	for _, line := range strings.Split(l.String(), "\n") {
		if strings.HasPrefix(line, "{") {
			var rec struct{ Msg, Addr string }
			if json.Unmarshal([]byte(line), &rec) == nil && rec.Msg == msg {
				return rec.Addr
			}
			continue
		}
		if strings.Contains(line, `msg="`+msg+`"`) {
			if _, addr, ok := strings.Cut(line, " addr="); ok {
				return strings.Fields(addr)[0]
			}
		}
	}
	return ""
}

// stop sends SIGTERM and returns the exit code.
func (d *proc) stop(t testing.TB) int {
	t.Helper()
	if err := d.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.done:
		d.done <- nil // let Cleanup's receive return
	case <-time.After(20 * time.Second):
		t.Fatal("daemon did not exit within 20s of SIGTERM")
	}
	return d.cmd.ProcessState.ExitCode()
}

func policyAsk(t testing.TB, c net.Conn, br *bufio.Reader, attrs ...string) string {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	req := "request=smtpd_access_policy\n" + strings.Join(attrs, "\n") + "\n\n"
	if _, err := io.WriteString(c, req); err != nil {
		t.Fatal(err)
	}
	line, err := br.ReadString('\n')
	if err != nil {
		t.Fatalf("reading reply: %v", err)
	}
	if blank, err := br.ReadString('\n'); err != nil || blank != "\n" {
		t.Fatalf("reply not terminated by an empty line: %q %v", blank, err)
	}
	return strings.TrimSuffix(line, "\n")
}

func TestDaemonServesReloadsAndStops(t *testing.T) {
	cfg := t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("connection_shaper threshold 1\n"), 0o644)
	d := startDaemon(t, "--config", cfg)

	resp, err := http.Get("http://" + d.http + "/healthz")
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("healthz: %v %v", resp, err)
	}
	resp.Body.Close()

	c, err := net.Dial("tcp", d.policy)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	ask := func(port string) string {
		return policyAsk(t, c, br, "protocol_state=RCPT", "client_address=192.0.2.1", "client_port="+port, "recipient=r@example.test")
	}
	if got := ask("1"); got != "action=DUNNO" {
		t.Fatalf("first session: %s", got)
	}
	if got := ask("2"); !strings.HasPrefix(got, "action=450 4.7.1 Too many connections") {
		t.Fatalf("second session: %s", got)
	}
	d.log.waitFor(t, "msg=decision", 1)
	if !strings.Contains(d.log.String(), "answer=DENYSOFT") {
		t.Fatalf("decision line lacks the answer:\n%s", d.log.String())
	}

	// A bad config is refused on SIGHUP; the old chain keeps serving.
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("connection_shaper threshold x\n"), 0o644)
	d.cmd.Process.Signal(syscall.SIGHUP)
	d.log.waitFor(t, "reload refused", 1)
	if !strings.Contains(d.log.String(), cfg+"/plugins:1: connection_shaper: threshold") {
		t.Fatalf("reload error lacks file:line:\n%s", d.log.String())
	}
	if got := ask("3"); !strings.HasPrefix(got, "action=450") {
		t.Fatalf("after a refused reload: %s", got)
	}
	// A good config is taken for new sessions.
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("connection_shaper threshold 100\n"), 0o644)
	d.cmd.Process.Signal(syscall.SIGHUP)
	d.log.waitFor(t, "msg=reloaded", 1)
	if got := ask("4"); got != "action=DUNNO" {
		t.Fatalf("after reload: %s", got)
	}

	if rc := d.stop(t); rc != 0 {
		t.Fatalf("exit code %d after SIGTERM", rc)
	}
	if _, err := net.Dial("tcp", d.policy); err == nil {
		t.Fatal("still accepting after SIGTERM")
	}
}

// A request in progress when SIGTERM arrives is still answered.
func TestDaemonFinishesOpenRequestOnSIGTERM(t *testing.T) {
	d := startDaemon(t, "--log-level", "debug")
	c, err := net.Dial("tcp", d.policy)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	// Half a request: the connection is busy.
	io.WriteString(c, "request=smtpd_access_policy\nprotocol_state=RCPT\n")
	d.log.waitFor(t, "policy request started", 1)
	// An idle connection, to be closed at once.
	idle, err := net.Dial("tcp", d.policy)
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	// Both connections must be registered before the signal.
	if got := policyAsk(t, idle, bufio.NewReader(idle), "protocol_state=RCPT", "client_address=192.0.2.9", "client_port=9"); got != "action=DUNNO" {
		t.Fatal(got)
	}
	d.cmd.Process.Signal(syscall.SIGTERM)
	// The idle connection is closed by the shutdown: once we see that,
	// the busy one is known to have been kept open by it.
	idle.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := idle.Read(make([]byte, 1)); n != 0 || !errors.Is(err, io.EOF) {
		t.Fatalf("idle connection after SIGTERM: %d bytes, %v", n, err)
	}
	io.WriteString(c, "client_address=192.0.2.1\nclient_port=5\n\n")
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	line, err := br.ReadString('\n')
	if err != nil || line != "action=DUNNO\n" {
		t.Fatalf("open request after SIGTERM: %q %v\n%s", line, err, d.log.String())
	}
	select {
	case <-d.done:
		d.done <- nil
	case <-time.After(20 * time.Second):
		t.Fatal("no exit after the open request was answered")
	}
	if rc := d.cmd.ProcessState.ExitCode(); rc != 0 {
		t.Fatalf("exit code %d", rc)
	}
}
