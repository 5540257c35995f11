package testmta

// A private, real Sendmail 8.17 for end-to-end tests of the milter.
//
// Debian's sendmail-bin conflicts with postfix, so it is never installed:
// scripts/install-deps.sh (run by `make deps` and `make test`) unpacks the
// .debs of sendmail-bin, sendmail-cf, m4 and libwrap0 into .cache/sendmail
// at the top of the checkout. StartSendmail builds a .cf from a .mc with the
// unpacked m4 and cf/m4/cf.m4 and runs `sendmail -bD` from that tree.

import (
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
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

// SendmailRootEnv names the environment variable that, when set, points at
// the unpacked Sendmail tree (the directory holding usr/) instead of
// .cache/sendmail in the checkout.
const SendmailRootEnv = "TESTMTA_SENDMAIL_ROOT"

// DefaultSendmailMilterFlags are the milter equates used when
// SendmailOptions.MilterFlags is empty: tempfail when the milter fails,
// and short timeouts.
const DefaultSendmailMilterFlags = "F=T, T=C:10s;S:10s;R:10s;E:30s"

// SendmailHostname is the qualified host name of every private Sendmail
// ($j, the greeting and Received: headers).
const SendmailHostname = "mta.example.test"

// SendmailOptions configures a private Sendmail instance.
type SendmailOptions struct {
	// MilterAddr, when not empty, is the host:port of a milter; it is
	// added as INPUT_MAIL_FILTER(`policyd', `S=inet:PORT@HOST, MilterFlags').
	MilterAddr string
	// MilterFlags are the F= and T= equates of the milter; empty means
	// DefaultSendmailMilterFlags.
	MilterFlags string
}

// Sendmail is a running private Sendmail instance.
type Sendmail struct {
	t    testing.TB
	dir  string
	addr string
	mc   string

	cmd    *exec.Cmd
	done   chan struct{}    // closed when the daemon has exited
	output *testsync.Buffer // the daemon's stdout and stderr

	stopOnce sync.Once
}

// sendmailTree is an unpacked Sendmail.
type sendmailTree struct {
	root    string
	bin     string // the sendmail binary
	m4      string // the m4 binary
	cfM4    string // cf/m4/cf.m4
	libPath string // LD_LIBRARY_PATH for the unpacked libwrap0
}

var sendmailTreeOnce struct {
	once sync.Once
	tree sendmailTree
	err  error
}

// StartSendmail starts a private Sendmail listening on a free port of
// 127.0.0.1, waits until it greets, and registers a cleanup that stops it
// by its PID and kills anything left in its process group. It calls
// t.Fatal if the unpacked Sendmail is missing (`make deps` provisions it)
// or if Sendmail does not come up.
//
// The instance accepts mail for any domain from any 127.0.0.0/8 client
// and keeps it in its own queue directory (QueueDir): deliveries are
// queue-only, no queue runner is started, ETRN is refused, and every
// address resolves to a mailer named "discard" that runs /bin/true, so
// nothing can leave the machine. As a consequence a milter sees
// {rcpt_mailer} and {mail_mailer} "discard"; {rcpt_host} and {rcpt_addr}
// are as usual.
//
// Sendmail runs as root (the tests do) in a private UTS namespace whose
// host name is SendmailHostname: Sendmail qualifies the machine's host
// name before it reads its .cf, and sleeps 60 s when it cannot.
func StartSendmail(t testing.TB, o SendmailOptions) *Sendmail {
	t.Helper()
	sendmailTreeOnce.once.Do(func() { sendmailTreeOnce.tree, sendmailTreeOnce.err = findSendmailTree() })
	if err := sendmailTreeOnce.err; err != nil {
		t.Fatalf("testmta: %v", err)
	}
	if os.Geteuid() != 0 {
		t.Fatalf("testmta: the private Sendmail must be started as root (euid is %d)", os.Geteuid())
	}
	if o.MilterFlags == "" {
		o.MilterFlags = DefaultSendmailMilterFlags
	}
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		s, err := startSendmail(t, sendmailTreeOnce.tree, o)
		if err == nil {
			return s
		}
		lastErr = err
		if !errors.Is(err, errAddrInUse) {
			break
		}
	}
	t.Fatalf("testmta: starting Sendmail: %v", lastErr)
	return nil
}

// cacheRoot is where a private MTA is unpacked: $env (a relative path
// is taken from the directory holding go.mod, where make runs), else
// .cache/name in that directory, found by walking up from the working
// directory.
func cacheRoot(env, name, hint string) (string, error) {
	wd, err := os.Getwd()
	if err != nil {
		return "", err
	}
	mod := ""
	for d := wd; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.mod")); err == nil {
			mod = d
			break
		}
		if filepath.Dir(d) == d {
			break
		}
	}
	root := os.Getenv(env)
	switch {
	case root != "" && !filepath.IsAbs(root) && mod != "":
		root = filepath.Join(mod, root)
	case root == "" && mod == "":
		return "", fmt.Errorf("no go.mod above %s, so no .cache/%s; %s", wd, name, hint)
	case root == "":
		root = filepath.Join(mod, ".cache", name)
	}
	return root, nil
}

// findSendmailTree locates the unpacked Sendmail: $TESTMTA_SENDMAIL_ROOT
// (a relative path is taken from the directory holding go.mod, where make
// runs), else .cache/sendmail in that directory, found by walking up from
// the working directory.
func findSendmailTree() (sendmailTree, error) {
	const hint = "`make deps` (also run by `make test`) unpacks it there; or set " + SendmailRootEnv
	root, err := cacheRoot(SendmailRootEnv, "sendmail", hint)
	if err != nil {
		return sendmailTree{}, err
	}
	tr := sendmailTree{root: root}
	for _, b := range []string{"usr/libexec/sendmail/sendmail", "usr/lib/sm.bin/sendmail"} {
		if st, err := os.Stat(filepath.Join(root, b)); err == nil && st.Mode().IsRegular() {
			tr.bin = filepath.Join(root, b)
			break
		}
	}
	if tr.bin == "" {
		return tr, fmt.Errorf("no unpacked Sendmail in %s (no usr/libexec/sendmail/sendmail); %s", root, hint)
	}
	tr.cfM4 = filepath.Join(root, "usr/share/sendmail/cf/m4/cf.m4")
	if _, err := os.Stat(tr.cfM4); err != nil {
		return tr, fmt.Errorf("no sendmail-cf in %s (%v); %s", root, err, hint)
	}
	tr.m4 = filepath.Join(root, "usr/bin/m4")
	if _, err := os.Stat(tr.m4); err != nil {
		m4, lerr := exec.LookPath("m4")
		if lerr != nil {
			return tr, fmt.Errorf("no m4 in %s nor on PATH; %s", root, hint)
		}
		tr.m4 = m4
	}
	var libs []string
	for _, pat := range []string{"lib/*-linux-gnu*", "usr/lib/*-linux-gnu*"} {
		m, _ := filepath.Glob(filepath.Join(root, pat))
		libs = append(libs, m...)
	}
	tr.libPath = strings.Join(libs, ":")
	return tr, nil
}

func startSendmail(t testing.TB, tree sendmailTree, o SendmailOptions) (*Sendmail, error) {
	t.Helper()
	// Short paths, as for Postfix; Sendmail itself has no UNIX-domain
	// sockets here, but a long t.TempDir() would make long queue paths.
	dir, _, err := instanceDir(t)
	if err != nil {
		return nil, err
	}
	port, err := testnet.FreePort()
	if err != nil {
		return nil, err
	}
	s := &Sendmail{
		t:      t,
		dir:    dir,
		addr:   net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		done:   make(chan struct{}),
		output: &testsync.Buffer{},
	}
	s.mc, err = sendmailMC(dir, port, o)
	if err != nil {
		return nil, err
	}
	bin, err := s.layout(tree)
	if err != nil {
		return nil, err
	}

	// Sendmail qualifies the host name before it reads the .cf, through
	// the system resolver, and sleeps 60 s if the name has no dot and no
	// dotted alias (as on a machine called "vm" with "127.0.0.1 vm" in
	// /etc/hosts). So it runs in a private UTS namespace whose host name
	// is qualified; sh sets it and then execs Sendmail under the same PID.
	const script = `echo "$TESTMTA_HOSTNAME" >/proc/sys/kernel/hostname && exec "$0" "$@"`
	s.cmd = exec.Command("/bin/sh", "-c", script, bin,
		"-C", s.cfPath(), "-bD")
	s.cmd.Dir = dir
	s.cmd.Stdout = s.output
	s.cmd.Stderr = s.output
	s.cmd.SysProcAttr, err = sendmailSysProcAttr()
	if err != nil {
		return nil, err
	}
	s.cmd.Env = []string{
		"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C", "TZ=UTC",
		"TESTMTA_HOSTNAME=" + SendmailHostname,
		// libwrap.so.0 is not on a Postfix machine; the binary is not
		// setgid (see layout), so the loader honours this.
		"LD_LIBRARY_PATH=" + tree.libPath,
	}
	if err := s.cmd.Start(); err != nil {
		return nil, fmt.Errorf("exec %s: %v", bin, err)
	}
	go func() {
		_ = s.cmd.Wait()
		close(s.done)
	}()
	// Registered after t.TempDir(), so it runs before the directory is
	// removed.
	t.Cleanup(func() {
		if t.Failed() {
			if out := s.output.String(); out != "" {
				t.Logf("testmta: Sendmail output:\n%s", testsync.Tail(out, 30))
			}
		}
		s.Stop()
	})

	if err := s.waitReady(startTimeout); err != nil {
		s.Stop()
		out := s.output.String()
		if strings.Contains(out, "Address already in use") {
			return nil, fmt.Errorf("%w: %v", errAddrInUse, err)
		}
		return nil, fmt.Errorf("%v\nSendmail output:\n%s", err, testsync.Tail(out, 30))
	}
	return s, nil
}

func (s *Sendmail) etcDir() string  { return filepath.Join(s.dir, "etc") }
func (s *Sendmail) cfPath() string  { return filepath.Join(s.etcDir(), "sendmail.cf") }
func (s *Sendmail) pidPath() string { return filepath.Join(s.dir, "sendmail.pid") }

// layout writes etc/ (the .mc, the .cf built from it, a service switch and
// an empty aliases file) and the queue directory, and returns the binary
// to run: the unpacked one, or a copy without its setgid bit.
func (s *Sendmail) layout(tree sendmailTree) (string, error) {
	for _, d := range []string{s.etcDir(), s.QueueDir()} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return "", err
		}
	}
	files := map[string]string{
		"sendmail.mc": s.mc,
		// Sendmail's own lookups (its $j, the hosts in addresses) go
		// to /etc/hosts only, never to DNS.
		"service.switch": "hosts\tfiles\naliases\tfiles\n",
		"aliases":        "",
	}
	for name, text := range files {
		if err := os.WriteFile(filepath.Join(s.etcDir(), name), []byte(text), 0o644); err != nil {
			return "", err
		}
	}

	cf, err := os.Create(s.cfPath())
	if err != nil {
		return "", err
	}
	var stderr strings.Builder
	m4 := exec.Command(tree.m4, tree.cfM4, "sendmail.mc")
	m4.Dir = s.etcDir()
	m4.Stdout = cf
	m4.Stderr = &stderr
	m4.Env = []string{"PATH=/usr/bin:/bin", "LANG=C"}
	err = m4.Run()
	if cerr := cf.Close(); err == nil {
		err = cerr
	}
	if err != nil || strings.Contains(stderr.String(), "ERROR") {
		return "", fmt.Errorf("building sendmail.cf with %s: %v\n%s", tree.m4, err, stderr.String())
	}

	// A setgid binary ignores LD_LIBRARY_PATH. install-deps.sh clears the
	// bit in .cache/sendmail; a tree from elsewhere may still have it.
	st, err := os.Stat(tree.bin)
	if err != nil {
		return "", err
	}
	if st.Mode()&(os.ModeSetgid|os.ModeSetuid) == 0 {
		return tree.bin, nil
	}
	bin := filepath.Join(s.dir, "sendmail")
	if err := copyFile(tree.bin, bin, 0o755); err != nil {
		return "", err
	}
	return bin, nil
}

func copyFile(from, to string, mode os.FileMode) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// sendmailMC returns the .mc of an instance in dir listening on
// 127.0.0.1:port.
func sendmailMC(dir string, port int, o SendmailOptions) (string, error) {
	milter := ""
	if o.MilterAddr != "" {
		host, mport, err := net.SplitHostPort(o.MilterAddr)
		if err != nil {
			return "", fmt.Errorf("MilterAddr %q: %v", o.MilterAddr, err)
		}
		family := "inet"
		if ip := net.ParseIP(host); ip != nil && ip.To4() == nil {
			family = "inet6"
		}
		if strings.ContainsAny(o.MilterFlags, "`'") {
			return "", fmt.Errorf("MilterFlags %q: quotes are not allowed", o.MilterFlags)
		}
		milter = fmt.Sprintf("INPUT_MAIL_FILTER(`policyd', `S=%s:%s@%s, %s')dnl\n", family, mport, host, o.MilterFlags)
	}
	if strings.ContainsAny(dir, "`'$,\n ") {
		return "", fmt.Errorf("instance directory %q has characters m4 or sendmail.cf cannot take", dir)
	}
	return fmt.Sprintf(sendmailMCTemplate, dir, port, milter), nil
}

// sendmailMCTemplate: %[1]s instance directory, %[2]d SMTP port, %[3]s the
// INPUT_MAIL_FILTER line or nothing.
const sendmailMCTemplate = `divert(-1)
# Written by testmta for one test: a private Sendmail on 127.0.0.1:%[2]d.
divert(0)dnl
VERSIONID(` + "`testmta'" + `)dnl
dnl Every file Sendmail would look for in /etc/mail is looked for in etc/ here.
define(` + "`MAIL_SETTINGS_DIR', `%[1]s/etc/'" + `)dnl
dnl Local and program mailers, never used (see LOCAL_RULE_0), run /bin/true.
define(` + "`PROCMAIL_MAILER_PATH', `/bin/true'" + `)dnl
define(` + "`LOCAL_SHELL_PATH', `/bin/true'" + `)dnl
OSTYPE(` + "`linux'" + `)dnl
define(` + "`confDOMAIN_NAME', `" + SendmailHostname + "'" + `)dnl
define(` + "`QUEUE_DIR', `%[1]s/queue'" + `)dnl
define(` + "`confPID_FILE', `%[1]s/sendmail.pid'" + `)dnl
define(` + "`ALIAS_FILE', `%[1]s/etc/aliases'" + `)dnl
dnl No DNS: Sendmail's own host lookups use etc/service.switch (hosts: files),
dnl no search list, no probing of the interfaces' names at start, no
dnl canonification of addresses, no resolution of the sender's domain, no
dnl IDENT query; a resolver query that still happens (the glibc reverse
dnl lookup of the client) gives up after 1 s.
define(` + "`confSERVICE_SWITCH_FILE', `%[1]s/etc/service.switch'" + `)dnl
define(` + "`confBIND_OPTS', `-DNSRCH -DEFNAMES'" + `)dnl
define(` + "`confTO_RESOLVER_RETRANS', `1s'" + `)dnl
define(` + "`confTO_RESOLVER_RETRY', `1'" + `)dnl
define(` + "`confDONT_PROBE_INTERFACES', `True'" + `)dnl
define(` + "`confTO_IDENT', `0s'" + `)dnl
FEATURE(` + "`nocanonify'" + `)dnl
FEATURE(` + "`accept_unresolvable_domains'" + `)dnl
dnl Nothing leaves: queue only, no queue runner, no ETRN, every address
dnl resolves to the discard mailer below.
define(` + "`confDELIVERY_MODE', `queueonly'" + `)dnl
define(` + "`confPRIVACY_FLAGS', `authwarnings,noetrn'" + `)dnl
dnl A loaded test machine must not make Sendmail refuse connections.
define(` + "`confREFUSE_LA', `1000'" + `)dnl
define(` + "`confQUEUE_LA', `1000'" + `)dnl
dnl No SMTP AUTH offered (the system's SASL configuration stays out of it).
define(` + "`confAUTH_MECHANISMS', `'" + `)dnl
dnl Only 127.0.0.1:port: no MSA on 0.0.0.0:587.
FEATURE(` + "`no_default_msa'" + `)dnl
DAEMON_OPTIONS(` + "`Port=%[2]d, Addr=127.0.0.1, Name=MTA, Family=inet'" + `)dnl
dnl Relaying for clients in 127.0.0.0/8 (class R matches address prefixes).
RELAY_DOMAIN(` + "`127'" + `)dnl
%[3]sMAILER_DEFINITIONS
Mdiscard,	P=/bin/true, F=lsmDFMq, A=true
LOCAL_RULE_0
R$* < @ $+ . > $*	$#discard $@ $2 $: $1 < @ $2 . > $3
R$* < @ $+ > $*		$#discard $@ $2 $: $1 < @ $2 > $3
R$+			$#discard $: $1
`

// waitReady polls the daemon's port until it greets. A greeting other than
// 220 (421 or 554, from a milter that refuses the probing connection) also
// means the daemon is up.
func (s *Sendmail) waitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var lastErr error
	for time.Now().Before(deadline) {
		select {
		case <-s.done:
			return fmt.Errorf("sendmail exited during startup (%v)", s.cmd.ProcessState)
		default:
		}
		// The daemon writes its PID file once it listens: until then
		// there is nothing to probe.
		if _, err := os.Stat(s.pidPath()); err != nil {
			lastErr = err
			time.Sleep(10 * time.Millisecond)
			continue
		}
		lastErr = probeGreeting(s.addr)
		if lastErr == nil {
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("sendmail at %s did not greet within %v: %v", s.addr, timeout, lastErr)
}

func probeGreeting(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	sm := &SMTP{conn: c, r: newReader(c)}
	r, err := sm.readReply()
	if err != nil {
		return err
	}
	switch r.Code {
	case 220, 421, 554:
		_, _ = sm.Cmd("QUIT")
		return nil
	}
	return fmt.Errorf("greeting: %s", r)
}

// Addr returns the host:port (127.0.0.1:port) Sendmail listens on.
func (s *Sendmail) Addr() string { return s.addr }

// Dir returns the instance directory (etc/ with sendmail.mc and
// sendmail.cf, queue/, sendmail.pid).
func (s *Sendmail) Dir() string { return s.dir }

// QueueDir returns the queue directory, where accepted messages stay
// (qf* and df* files).
func (s *Sendmail) QueueDir() string { return filepath.Join(s.dir, "queue") }

// MC returns the .mc the instance's sendmail.cf was built from.
func (s *Sendmail) MC() string { return s.mc }

// PID returns the process ID of the Sendmail daemon.
func (s *Sendmail) PID() int { return s.cmd.Process.Pid }

// Output returns what the daemon wrote to its stdout and stderr (there is
// no syslog: this is all of its log that survives).
func (s *Sendmail) Output() string { return s.output.String() }

// Stop stops Sendmail: it gives the children of ended sessions up to a
// second to exit, sends SIGTERM to the daemon by its PID, waits for it to
// exit and sends SIGKILL after a deadline; then whatever is left in its
// process group (children of sessions still open) gets SIGTERM and, after
// a deadline, SIGKILL. It is safe to call more than once; StartSendmail registers it
// as a cleanup.
func (s *Sendmail) Stop() {
	s.stopOnce.Do(func() {
		pid := s.cmd.Process.Pid
		// Let the per-connection children whose sessions have ended go
		// first, so that the daemon reaps them: a child it has not
		// reaped when it exits stays a zombie until PID 1 reaps it.
		deadline := time.Now().Add(time.Second)
		for time.Now().Before(deadline) && !onlyMember(groupMembers(pid), pid) {
			time.Sleep(5 * time.Millisecond)
		}
		_ = syscall.Kill(pid, syscall.SIGTERM)
		select {
		case <-s.done:
		case <-time.After(stopTimeout):
			s.t.Errorf("testmta: Sendmail %d did not exit %v after SIGTERM; killing it", pid, stopTimeout)
			_ = syscall.Kill(pid, syscall.SIGKILL)
			<-s.done
		}
		// Children still running (a session left open) get SIGTERM,
		// then SIGKILL.
		if waitGroupGone(pid, time.Second) {
			return
		}
		_ = syscall.Kill(-pid, syscall.SIGTERM)
		if waitGroupGone(pid, stopTimeout) {
			return
		}
		_ = syscall.Kill(-pid, syscall.SIGKILL)
		if !waitGroupGone(pid, stopTimeout) {
			s.t.Errorf("testmta: Sendmail processes in process group %d survive SIGKILL", pid)
		}
	})
}

// onlyMember reports whether pids is empty or just pid.
func onlyMember(pids []int, pid int) bool {
	return len(pids) == 0 || (len(pids) == 1 && pids[0] == pid)
}
