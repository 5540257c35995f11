package testmta

// A private, real Exim 4.96 for end-to-end tests of the policy front-end
// behind Exim's ACLs (deploy/exim).
//
// exim4-daemon-light conflicts with postfix, so it is never installed:
// scripts/install-deps.sh unpacks it into .cache/exim at the top of the
// checkout (or $TESTMTA_EXIM_ROOT) and creates its compiled-in user
// Debian-exim. An instance keeps its configuration, spool and logs in a
// directory of its own; mail is only queued (queue_only), never delivered:
// Exim delivers by re-executing itself at its compiled-in path, which a
// private tree is not at.

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/testing/testnet"
	"github.com/policyd-mail/policyd/internal/testing/testsync"
)

// EximRootEnv names the environment variable that, when set, points at the
// unpacked Exim tree (the directory holding usr/) instead of .cache/exim.
const EximRootEnv = "TESTMTA_EXIM_ROOT"

// EximOptions configures a private Exim.
type EximOptions struct {
	// Main are lines for the main section, such as a macro definition
	// ("POLICYD_SOCKET = inet:127.0.0.1:PORT").
	Main []string
	// Rcpt are files .included at the top of the RCPT ACL, before it
	// accepts mail for example.test (and refuses relaying elsewhere).
	Rcpt []string
	// Data are files .included at the top of the DATA ACL.
	Data []string
	// Quit are files .included in the QUIT and not-QUIT ACLs.
	Quit []string
}

// EximDeployOptions wires a private Exim to a policy server at policy
// exactly as deploy/exim says: the repository's ACL files, .included as
// they are, and the socket in the POLICYD_SOCKET macro. repo is the
// checkout's top directory, seen from the test.
func EximDeployOptions(t testing.TB, repo, policy string) EximOptions {
	t.Helper()
	abs := func(name string) string {
		p, err := filepath.Abs(filepath.Join(repo, "deploy", "exim", name))
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	return EximOptions{
		Main: []string{"POLICYD_SOCKET = inet:" + policy},
		Rcpt: []string{abs("policyd.acl")},
		Data: []string{abs("policyd-data.acl")},
		Quit: []string{abs("policyd-quit.acl")},
	}
}

// EximConf is a private Exim's configuration and directories; -bh runs
// and a daemon both use it.
type EximConf struct {
	bin  string
	dir  string
	port int
}

// Exim is a running private Exim daemon.
type Exim struct {
	*EximConf
	addr     string
	cmd      *exec.Cmd
	done     chan struct{}
	output   *testsync.Buffer
	stopOnce sync.Once
}

var eximBinOnce struct {
	once sync.Once
	bin  string
	err  error
}

// NewEximConf writes a private Exim's configuration. It calls t.Fatal if
// the unpacked Exim is missing (`make deps` provisions it).
func NewEximConf(t testing.TB, o EximOptions) *EximConf {
	t.Helper()
	eximBinOnce.once.Do(func() { eximBinOnce.bin, eximBinOnce.err = findExim() })
	if err := eximBinOnce.err; err != nil {
		t.Fatalf("testmta: %v", err)
	}
	if os.Geteuid() != 0 {
		t.Fatalf("testmta: the private Exim must be run as root (euid is %d)", os.Geteuid())
	}
	// Exim's user writes the spool and the logs.
	dir, err := reachableDir(t)
	if err != nil {
		t.Fatal(err)
	}
	port, err := testnet.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	c := &EximConf{bin: eximBinOnce.bin, dir: dir, port: port}
	u, err := user.Lookup("Debian-exim")
	if err != nil {
		t.Fatalf("testmta: Exim's user: %v (`make deps` creates it)", err)
	}
	uid, _ := strconv.Atoi(u.Uid)
	gid, _ := strconv.Atoi(u.Gid)
	for _, d := range []string{"spool", "log"} {
		p := filepath.Join(dir, d)
		if err := os.MkdirAll(p, 0o750); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(p, uid, gid); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(c.confPath(), []byte(eximConfig(c, o)), 0o644); err != nil {
		t.Fatal(err)
	}
	return c
}

func (c *EximConf) confPath() string { return filepath.Join(c.dir, "exim.conf") }

// MainLog is the instance's main log.
func (c *EximConf) MainLog() string {
	b, _ := os.ReadFile(filepath.Join(c.dir, "log", "mainlog"))
	return string(b)
}

func eximConfig(c *EximConf, o EximOptions) string {
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format+"\n", a...) }
	w("# Written by testmta for one test; private to this directory.")
	w("primary_hostname = mta.example.test")
	w("spool_directory = %s", filepath.Join(c.dir, "spool"))
	w("log_file_path = %s", filepath.Join(c.dir, "log", "%slog"))
	w("pid_file_path = %s", filepath.Join(c.dir, "exim.pid"))
	w("local_interfaces = 127.0.0.1")
	w("daemon_smtp_ports = %d", c.port)
	w("keep_environment =")
	w("# No DNS, no ident: loopback only.")
	w("host_lookup =")
	w("rfc1413_hosts =")
	w("domainlist local_domains = example.test")
	w("queue_only = true")
	w("smtp_accept_max = 200")
	w("smtp_accept_queue_per_connection = 0")
	w("acl_smtp_rcpt = acl_check_rcpt")
	w("acl_smtp_data = acl_check_data")
	w("acl_smtp_quit = acl_check_quit")
	w("acl_smtp_notquit = acl_check_notquit")
	for _, l := range o.Main {
		w("%s", l)
	}
	w("begin acl")
	w("acl_check_rcpt:")
	for _, f := range o.Rcpt {
		w(".include %s", f)
	}
	w("  accept domains = +local_domains")
	w("  deny message = relay not permitted")
	w("acl_check_data:")
	for _, f := range o.Data {
		w(".include %s", f)
	}
	w("  accept")
	for _, name := range []string{"acl_check_quit", "acl_check_notquit"} {
		w("%s:", name)
		for _, f := range o.Quit {
			w(".include %s", f)
		}
		w("  accept")
	}
	w("begin routers")
	w("discard_all:")
	w("  driver = redirect")
	w("  data = :blackhole:")
	return b.String()
}

// BH runs one SMTP dialogue through Exim's ACLs with `exim -bh`, as if
// from client ("IP.PORT"), with no daemon: smtp is the client's side
// (CRLFs added), the result Exim's side.
func (c *EximConf) BH(t testing.TB, client, smtp string) string {
	t.Helper()
	out, _ := c.dialogue(t, smtp, "-bh", client)
	return out
}

// BHTrace is BH with Exim's trace of the dialogue (its ">>>" lines on
// standard error: ACL steps, host lookups).
func (c *EximConf) BHTrace(t testing.TB, client, smtp string) (replies, trace string) {
	t.Helper()
	return c.dialogue(t, smtp, "-bh", client)
}

// BS runs one SMTP dialogue through Exim for real (`exim -bs`, no
// daemon), as if from client ("IP.PORT") whose name Exim verified as
// name: what `host_lookup` would have found, without DNS.
func (c *EximConf) BS(t testing.TB, client, name, smtp string) string {
	t.Helper()
	out, _ := c.dialogue(t, smtp, "-bs", "-oMa", client, "-oMs", name)
	return out
}

func (c *EximConf) dialogue(t testing.TB, smtp string, args ...string) (replies, trace string) {
	t.Helper()
	cmd := exec.Command(c.bin, append([]string{"-C", c.confPath()}, args...)...)
	cmd.Dir = c.dir
	cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C", "TZ=UTC"}
	cmd.Stdin = strings.NewReader(strings.ReplaceAll(strings.TrimRight(smtp, "\n")+"\n", "\n", "\r\n"))
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		t.Fatalf("testmta: exim %s: %v", args[0], err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err := <-done:
		if err != nil && out.Len() == 0 {
			t.Fatalf("testmta: exim %s: %v\n%s", args[0], err, testsync.Tail(errb.String(), 30))
		}
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		t.Fatalf("testmta: exim %s did not finish within 30s\n%s", args[0], testsync.Tail(errb.String(), 30))
	}
	var lines []string
	for _, l := range strings.Split(out.String(), "\n") {
		l = strings.TrimRight(l, "\r")
		if l == "" || strings.HasPrefix(l, "**** ") {
			continue
		}
		lines = append(lines, l)
	}
	return strings.Join(lines, "\n"), errb.String()
}

// StartExim starts a private Exim daemon on a free port of 127.0.0.1 with
// the configuration of NewEximConf, waits until it greets, and registers a
// cleanup that stops it by its PID.
func StartExim(t testing.TB, o EximOptions) *Exim {
	t.Helper()
	c := NewEximConf(t, o)
	e := &Exim{
		EximConf: c,
		addr:     net.JoinHostPort("127.0.0.1", strconv.Itoa(c.port)),
		done:     make(chan struct{}),
		output:   &testsync.Buffer{},
	}
	// -bdf: the daemon stays in the foreground, a child of the test.
	e.cmd = exec.Command(c.bin, "-C", c.confPath(), "-bdf")
	e.cmd.Dir = c.dir
	e.cmd.Stdout, e.cmd.Stderr = e.output, e.output
	e.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	e.cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C", "TZ=UTC"}
	if err := e.cmd.Start(); err != nil {
		t.Fatalf("testmta: exec %s: %v", c.bin, err)
	}
	go func() {
		_ = e.cmd.Wait()
		close(e.done)
	}()
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("testmta: Exim mainlog:\n%s", testsync.Tail(e.MainLog(), 40))
			if out := e.output.String(); out != "" {
				t.Logf("testmta: Exim output:\n%s", testsync.Tail(out, 30))
			}
		}
		e.Stop()
	})
	deadline := time.Now().Add(startTimeout)
	for {
		err := probe(e.addr)
		if err == nil {
			return e
		}
		select {
		case <-e.done:
			t.Fatalf("testmta: Exim exited at start\n%s\npaniclog:\n%s", e.output.String(), e.panicLog())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("testmta: Exim did not greet on %s within %v: %v\n%s", e.addr, startTimeout, err, e.output.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (e *Exim) panicLog() string {
	b, _ := os.ReadFile(filepath.Join(e.dir, "log", "paniclog"))
	return string(b)
}

// Addr is the daemon's host:port.
func (e *Exim) Addr() string { return e.addr }

// Stop stops the daemon and whatever it forked, by process group.
func (e *Exim) Stop() {
	e.stopOnce.Do(func() {
		pgid := e.cmd.Process.Pid
		_ = syscall.Kill(-pgid, syscall.SIGTERM)
		select {
		case <-e.done:
		case <-time.After(5 * time.Second):
			_ = syscall.Kill(-pgid, syscall.SIGKILL)
			<-e.done
		}
		waitGroupGone(pgid, 5*time.Second)
	})
}

// findExim locates the unpacked Exim: $TESTMTA_EXIM_ROOT, else
// .cache/exim (cacheRoot).
func findExim() (string, error) {
	const hint = "`make deps` (also run by `make test`) unpacks it there; or set " + EximRootEnv
	root, err := cacheRoot(EximRootEnv, "exim", hint)
	if err != nil {
		return "", err
	}
	bin := filepath.Join(root, "usr", "sbin", "exim4")
	if _, err := os.Stat(bin); err != nil {
		return "", fmt.Errorf("no private Exim at %s: %s", bin, hint)
	}
	return bin, nil
}
