// Package testmta starts a private, real Postfix on loopback for end-to-end
// tests and drives SMTP sessions against it.
//
// Start writes a self-contained Postfix configuration (main.cf, master.cf,
// queue directory, data directory, maillog) into a per-test temporary
// directory and runs the Postfix master(8) daemon in the foreground as a
// child process of the test, so it never touches the system Postfix, several
// instances can run at once, and the test stops it by its PID. Every
// delivery goes to the discard(8) transport: nothing leaves the machine.
//
// Running the master requires root, as Postfix does. The package is meant
// for Linux, where all of 127.0.0.0/8 is routed to the loopback interface,
// so a session can use any 127.0.0.N as its source address without any
// interface configuration.
//
// StartSendmail does the same with a private Sendmail 8.17 unpacked into
// .cache/sendmail by scripts/install-deps.sh (see sendmail_mta.go).
package testmta

import (
	"errors"
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

// Options configures a private Postfix instance.
type Options struct {
	// PolicyAddr, when not empty, is a host:port of a policy delegation
	// server; it is consulted at RCPT TO with
	// check_policy_service { inet:PolicyAddr, timeout=10s,
	// { default_action = 451 4.3.5 policy unavailable } }.
	PolicyAddr string
	// MilterAddr, when not empty, is a host:port of a milter; it is set as
	// smtpd_milters = inet:MilterAddr with milter_protocol = 6 and
	// milter_default_action = tempfail.
	MilterAddr string
	// ExtraMainCF lines are main.cf settings: one of a parameter Start
	// already sets replaces it where it stands, others are appended, so
	// main.cf never sets a parameter twice.
	ExtraMainCF []string
}

// Postfix is a running private Postfix instance.
type Postfix struct {
	t       testing.TB
	dir     string
	addr    string
	maillog string

	cmd    *exec.Cmd
	done   chan struct{}    // closed when the master has exited
	output *testsync.Buffer // master's stdout and stderr

	stopOnce sync.Once
}

// How long Start waits for the 220 banner, and Stop for the master to exit.
const (
	startTimeout = 15 * time.Second
	stopTimeout  = 10 * time.Second
)

// Locations of the master daemon when postconf cannot tell.
var masterCandidates = []string{
	"/usr/lib/postfix/sbin/master",
	"/usr/libexec/postfix/master",
	"/usr/lib/postfix/master",
}

// Start starts a private Postfix, waits until its smtpd answers with a 220
// banner, and registers a cleanup that stops it (and, if the test failed,
// logs the tail of its maillog). It calls t.Fatal if Postfix is not
// installed or does not come up.
func Start(t testing.TB, o Options) *Postfix {
	t.Helper()
	master := findMaster(t)
	owner, err := lookupIDs()
	if err != nil {
		t.Fatalf("testmta: %v", err)
	}
	if os.Geteuid() != 0 {
		t.Fatalf("testmta: the Postfix master must run as root (euid is %d)", os.Geteuid())
	}

	// A bind race on the chosen port is possible when other processes grab
	// free ports at the same time: retry with a fresh port.
	var lastErr error
	for attempt := 0; attempt < 3; attempt++ {
		p, err := start(t, master, owner, o)
		if err == nil {
			return p
		}
		lastErr = err
		if !errors.Is(err, errAddrInUse) {
			break
		}
	}
	t.Fatalf("testmta: starting Postfix: %v", lastErr)
	return nil
}

var errAddrInUse = errors.New("smtpd port already in use")

type ids struct{ uid, gid, postdropGID int }

func lookupIDs() (ids, error) {
	u, err := user.Lookup("postfix")
	if err != nil {
		return ids{}, fmt.Errorf("no postfix user (make test installs Postfix): %v", err)
	}
	g, err := user.LookupGroup("postdrop")
	if err != nil {
		return ids{}, fmt.Errorf("no postdrop group (make test installs Postfix): %v", err)
	}
	var r ids
	r.uid, _ = strconv.Atoi(u.Uid)
	r.gid, _ = strconv.Atoi(u.Gid)
	r.postdropGID, _ = strconv.Atoi(g.Gid)
	return r, nil
}

var masterPath struct {
	once sync.Once
	path string
	err  error
}

// findMaster returns the path of the Postfix master(8) daemon, or calls
// t.Fatal if Postfix is not installed.
func findMaster(t testing.TB) string {
	t.Helper()
	masterPath.once.Do(func() { masterPath.path, masterPath.err = lookupMaster() })
	if masterPath.err != nil {
		t.Fatalf("testmta: %v", masterPath.err)
	}
	return masterPath.path
}

func lookupMaster() (string, error) {
	postfix, err := exec.LookPath("postfix")
	if err != nil {
		if _, err2 := os.Stat("/usr/sbin/postfix"); err2 != nil {
			return "", fmt.Errorf("Postfix is not installed (%v); `make test` installs it (apt-get install postfix)", err)
		}
		postfix = "/usr/sbin/postfix"
	}
	var paths []string
	// Ask postconf for the daemon directory. It refuses to run without a
	// main.cf (and a fresh package install may have none in /etc/postfix),
	// so point it at an empty configuration directory.
	postconf := filepath.Join(filepath.Dir(postfix), "postconf")
	if tmp, err := os.MkdirTemp("", "testmta-postconf"); err == nil {
		_ = os.WriteFile(filepath.Join(tmp, "main.cf"), nil, 0o644)
		_ = os.WriteFile(filepath.Join(tmp, "master.cf"), nil, 0o644)
		out, err := exec.Command(postconf, "-c", tmp, "-dh", "daemon_directory").Output()
		os.RemoveAll(tmp)
		if err == nil {
			paths = append(paths, filepath.Join(strings.TrimSpace(string(out)), "master"))
		}
	}
	paths = append(paths, masterCandidates...)
	for _, m := range paths {
		if st, err := os.Stat(m); err == nil && st.Mode().IsRegular() && st.Mode()&0o111 != 0 {
			return m, nil
		}
	}
	return "", fmt.Errorf("found %s but not the Postfix master daemon (looked at %v); `make test` installs Postfix", postfix, paths)
}

// instanceDir returns a directory for one instance. UNIX-domain socket
// paths (queue/private/proxywrite and so on) are limited to about 107
// bytes, so when t.TempDir() is long a short directory under /tmp is used.
func instanceDir(t testing.TB) (dir string, fromTempDir bool, err error) {
	dir = t.TempDir()
	if len(dir) <= 60 {
		return dir, true, nil
	}
	short, err := os.MkdirTemp("/tmp", "testmta")
	if err != nil {
		return "", false, err
	}
	t.Cleanup(func() { os.RemoveAll(short) })
	return short, false, nil
}

// reachableDir is instanceDir opened to the MTA's own user: t.TempDir()
// and the per-test directory above it are created with mode 0700.
func reachableDir(t testing.TB) (string, error) {
	dir, fromTempDir, err := instanceDir(t)
	if err != nil {
		return "", err
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		return "", err
	}
	if fromTempDir {
		if err := os.Chmod(filepath.Dir(dir), 0o755); err != nil {
			return "", err
		}
	}
	return dir, nil
}

// waitGroupGone waits until no live process is left in process group pgid.
func waitGroupGone(pgid int, timeout time.Duration) bool {
	deadline := time.Now().Add(timeout)
	for groupAlive(pgid) {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(10 * time.Millisecond)
	}
	return true
}

func start(t testing.TB, master string, owner ids, o Options) (*Postfix, error) {
	t.Helper()
	// The postfix user has to reach the queue directory.
	dir, err := reachableDir(t)
	if err != nil {
		return nil, err
	}
	port, err := testnet.FreePort()
	if err != nil {
		return nil, err
	}
	p := &Postfix{
		t:       t,
		dir:     dir,
		addr:    net.JoinHostPort("127.0.0.1", strconv.Itoa(port)),
		maillog: filepath.Join(dir, "maillog"),
		done:    make(chan struct{}),
		output:  &testsync.Buffer{},
	}
	if err := p.layout(owner, port, o); err != nil {
		return nil, err
	}

	args := []string{"-c", p.confDir(), "-d", "-e", strconv.Itoa(exitTime(t))}
	p.cmd = exec.Command(master, args...)
	p.cmd.Dir = dir
	p.cmd.Stdout = p.output
	p.cmd.Stderr = p.output
	// Its own process group: the master kills its group on SIGTERM, and
	// Stop can make sure no child survives. (Pdeathsig would be no safety
	// net: the kernel clears it when the master changes its effective
	// IDs; -e above is the safety net.)
	p.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	p.cmd.Env = []string{"PATH=/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C", "TZ=UTC"}
	if err := p.cmd.Start(); err != nil {
		return nil, fmt.Errorf("exec %s: %v", master, err)
	}
	go func() {
		_ = p.cmd.Wait()
		close(p.done)
	}()
	// Registered after t.TempDir(), so it runs before the directory is
	// removed.
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("testmta: tail of Postfix maillog %s:\n%s", p.maillog, testsync.Tail(p.Maillog(), 60))
			if out := p.output.String(); out != "" {
				t.Logf("testmta: Postfix master output:\n%s", testsync.Tail(out, 30))
			}
		}
		p.Stop()
	})

	if err := p.waitReady(startTimeout); err != nil {
		p.Stop()
		log := p.Maillog() + p.output.String()
		if strings.Contains(log, "Address already in use") {
			return nil, fmt.Errorf("%w: %v", errAddrInUse, err)
		}
		return nil, fmt.Errorf("%v\nmaster output:\n%s\nmaillog tail:\n%s", err, testsync.Tail(p.output.String(), 30), testsync.Tail(p.Maillog(), 40))
	}
	return p, nil
}

// exitTime is the master's -e argument: a safety net so that a test binary
// killed before its cleanups run does not leave Postfix running forever.
func exitTime(t testing.TB) int {
	if d, ok := t.(interface{ Deadline() (time.Time, bool) }); ok {
		if dl, ok := d.Deadline(); ok {
			if s := int(time.Until(dl).Seconds()) + 60; s > 60 {
				return s
			}
			return 60
		}
	}
	return 3600
}

func (p *Postfix) confDir() string  { return filepath.Join(p.dir, "etc") }
func (p *Postfix) queueDir() string { return filepath.Join(p.dir, "spool") }
func (p *Postfix) dataDir() string  { return filepath.Join(p.dir, "data") }

// layout creates the configuration, queue and data directories.
func (p *Postfix) layout(owner ids, port int, o Options) error {
	mk := func(path string, mode os.FileMode, uid, gid int) error {
		if err := os.MkdirAll(path, mode); err != nil {
			return err
		}
		if err := os.Chown(path, uid, gid); err != nil {
			return err
		}
		return os.Chmod(path, mode) // MkdirAll is subject to the umask
	}
	if err := mk(p.confDir(), 0o755, 0, 0); err != nil {
		return err
	}
	if err := mk(p.queueDir(), 0o755, 0, 0); err != nil {
		return err
	}
	// As Postfix's postfix-files lays them out.
	for _, d := range []string{"active", "bounce", "corrupt", "defer", "deferred", "flush", "hold", "incoming", "private", "saved", "trace"} {
		if err := mk(filepath.Join(p.queueDir(), d), 0o700, owner.uid, -1); err != nil {
			return err
		}
	}
	if err := mk(filepath.Join(p.queueDir(), "maildrop"), 0o730, owner.uid, owner.postdropGID); err != nil {
		return err
	}
	if err := mk(filepath.Join(p.queueDir(), "public"), 0o710, owner.uid, owner.postdropGID); err != nil {
		return err
	}
	if err := mk(filepath.Join(p.queueDir(), "pid"), 0o755, 0, 0); err != nil {
		return err
	}
	if err := mk(p.dataDir(), 0o700, owner.uid, -1); err != nil {
		return err
	}
	files := map[string]string{"main.cf": p.mainCF(o), "master.cf": masterCF(port)}
	for name, text := range files {
		path := filepath.Join(p.confDir(), name)
		if err := os.WriteFile(path, []byte(text), 0o644); err != nil {
			return err
		}
		// Postfix waits in 300 ms steps until a configuration file is
		// more than a second old ("let it settle down", against reading
		// a file an editor is still writing): backdate it, which saves
		// about 2 s per start.
		old := time.Now().Add(-time.Hour)
		if err := os.Chtimes(path, old, old); err != nil {
			return err
		}
	}
	return nil
}

func (p *Postfix) mainCF(o Options) string {
	var b strings.Builder
	w := func(format string, a ...any) { fmt.Fprintf(&b, format+"\n", a...) }
	w("# Written by testmta for one test; private to this directory.")
	w("compatibility_level = 3.6")
	w("queue_directory = %s", p.queueDir())
	w("data_directory = %s", p.dataDir())
	w("mail_owner = postfix")
	w("setgid_group = postdrop")
	w("")
	w("# Logging to a private file, through postlogd (see master.cf).")
	w("maillog_file = %s", p.maillog)
	w("maillog_file_prefixes = %s", p.dir)
	w("syslog_name = testmta")
	w("")
	w("# Names and networks: loopback only, no DNS.")
	w("myhostname = mta.example.test")
	w("mydomain = example.test")
	w("myorigin = $myhostname")
	w("mydestination =")
	w("relay_domains =")
	w("inet_interfaces = 127.0.0.1")
	w("inet_protocols = ipv4")
	w("mynetworks = 127.0.0.0/8")
	w("smtpd_peername_lookup = no")
	w("smtp_dns_support_level = disabled")
	w("lmtp_dns_support_level = disabled")
	w("smtp_host_lookup = native")
	w("append_dot_mydomain = no")
	w("biff = no")
	w("")
	w("# Nothing is ever delivered: every transport is discard(8).")
	w("default_transport = discard")
	w("relay_transport = discard")
	w("local_transport = discard")
	w("virtual_transport = discard")
	w("alias_maps =")
	w("alias_database =")
	w("local_recipient_maps =")
	w("")
	w("# smtpd")
	w("smtpd_banner = $myhostname ESMTP testmta")
	w("smtpd_delay_reject = yes")
	w("smtpd_helo_required = no")
	w("smtpd_client_restrictions =")
	w("smtpd_helo_restrictions =")
	w("smtpd_sender_restrictions =")
	w("smtpd_relay_restrictions = permit_mynetworks, reject_unauth_destination")
	if o.PolicyAddr != "" {
		w("smtpd_recipient_restrictions = check_policy_service { inet:%s, timeout=10s, { default_action = 451 4.3.5 policy unavailable } }, permit", o.PolicyAddr)
	} else {
		w("smtpd_recipient_restrictions = permit")
	}
	w("smtpd_error_sleep_time = 0")
	w("smtpd_soft_error_limit = 1000")
	w("smtpd_hard_error_limit = 1000")
	w("smtpd_client_event_limit_exceptions = 0.0.0.0/0")
	w("in_flow_delay = 0")
	w("")
	w("# Milter")
	w("milter_protocol = 6")
	w("milter_default_action = tempfail")
	if o.MilterAddr != "" {
		w("smtpd_milters = inet:%s", o.MilterAddr)
	} else {
		w("smtpd_milters =")
	}
	w("non_smtpd_milters =")
	return mergeMainCF(b.String(), o.ExtraMainCF)
}

// mergeMainCF applies extra main.cf lines to base: a parameter base sets
// already is replaced where it stands, a new one is appended. Postfix
// takes the last of duplicate settings, but warns about each at every
// start, and with logging through postlogd those warnings stalled
// smtpd's first banner on a fresh machine. A line that starts with
// white space continues the parameter before it.
func mergeMainCF(base string, extra []string) string {
	type param struct{ name, text string }
	var params []param
	index := map[string]int{}
	add := func(lines []string, replace bool) {
		last := -1
		for _, l := range lines {
			if l == "" || strings.HasPrefix(l, "#") {
				params = append(params, param{text: l})
				last = -1
				continue
			}
			if l[0] == ' ' || l[0] == '\t' {
				if last >= 0 {
					params[last].text += "\n" + l
				}
				continue
			}
			name, _, _ := strings.Cut(l, "=")
			name = strings.TrimSpace(name)
			if i, ok := index[name]; ok && replace {
				params[i].text, last = l, i
				continue
			}
			index[name] = len(params)
			last = len(params)
			params = append(params, param{name, l})
		}
	}
	add(strings.Split(strings.TrimSuffix(base, "\n"), "\n"), false)
	if len(extra) > 0 {
		params = append(params, param{}, param{text: "# Options.ExtraMainCF"})
		add(extra, true)
	}
	var b strings.Builder
	for _, p := range params {
		b.WriteString(p.text)
		b.WriteByte('\n')
	}
	return b.String()
}

// masterCF lists only the services needed to receive and discard mail. No
// service runs chrooted (a chroot would need copies of /etc files in the
// queue directory), and there is no smtp, lmtp, local or virtual delivery
// agent, so a test setting cannot make mail leave the machine.
func masterCF(port int) string {
	return fmt.Sprintf(`# Written by testmta for one test.
127.0.0.1:%d inet n - n - - smtpd
pickup     unix  n - n 60 1 pickup
cleanup    unix  n - n -  0 cleanup
qmgr       unix  n - n 300 1 qmgr
rewrite    unix  - - n -  - trivial-rewrite
bounce     unix  - - n -  0 bounce
defer      unix  - - n -  0 bounce
trace      unix  - - n -  0 bounce
verify     unix  - - n -  1 verify
flush      unix  n - n 1000? 0 flush
proxymap   unix  - - n -  - proxymap
proxywrite unix  - - n -  1 proxymap
showq      unix  n - n -  - showq
error      unix  - - n -  - error
retry      unix  - - n -  - error
discard    unix  - - n -  - discard
anvil      unix  - - n -  1 anvil
scache     unix  - - n -  1 scache
postlog    unix-dgram n - n - 1 postlogd
`, port)
}

// waitReady polls the smtpd port until it answers with a 220 banner.
func (p *Postfix) waitReady(timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var lastErr error
	for time.Now().Before(deadline) {
		select {
		case <-p.done:
			return fmt.Errorf("postfix master exited during startup (%v)", p.cmd.ProcessState)
		default:
		}
		lastErr = probe(p.addr)
		if lastErr == nil {
			return nil
		}
		// A broken configuration shows as a fatal error of a daemon
		// (smtpd is started on the first connection) or as throttling:
		// fail now rather than at the deadline.
		if log := p.Maillog(); strings.Contains(log, " fatal: ") || strings.Contains(log, "bad command startup") {
			return fmt.Errorf("postfix reports a fatal error during startup")
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("smtpd at %s did not answer 220 within %v: %v", p.addr, timeout, lastErr)
}

func probe(addr string) error {
	c, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	s := &SMTP{conn: c, r: newReader(c)}
	r, err := s.readReply()
	if err != nil {
		return err
	}
	if r.Code != 220 {
		return fmt.Errorf("banner: %s", r)
	}
	_, _ = s.Cmd("QUIT")
	return nil
}

// Addr returns the host:port smtpd listens on.
func (p *Postfix) Addr() string { return p.addr }

// Dir returns the instance directory (etc/, spool/, data/, maillog).
func (p *Postfix) Dir() string { return p.dir }

// MaillogPath returns the path of the instance's maillog file.
func (p *Postfix) MaillogPath() string { return p.maillog }

// Maillog returns the current contents of the instance's maillog.
func (p *Postfix) Maillog() string {
	b, err := os.ReadFile(p.maillog)
	if err != nil {
		return fmt.Sprintf("(no maillog: %v)", err)
	}
	return string(b)
}

// WaitMaillog waits up to timeout for a maillog line that contains all of
// substrs and returns it, or returns "", false.
func (p *Postfix) WaitMaillog(timeout time.Duration, substrs ...string) (string, bool) {
	deadline := time.Now().Add(timeout)
	for {
		for _, l := range strings.Split(p.Maillog(), "\n") {
			all := true
			for _, s := range substrs {
				if !strings.Contains(l, s) {
					all = false
					break
				}
			}
			if all {
				return l, true
			}
		}
		if time.Now().After(deadline) {
			return "", false
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Stop stops Postfix: SIGTERM to the master (which passes it on to its
// process group), wait for it to exit, SIGKILL the group after a deadline.
// It is safe to call more than once; Start registers it as a cleanup.
func (p *Postfix) Stop() {
	p.stopOnce.Do(func() {
		pid := p.cmd.Process.Pid
		_ = syscall.Kill(pid, syscall.SIGTERM)
		select {
		case <-p.done:
		case <-time.After(stopTimeout):
			p.t.Errorf("testmta: Postfix master %d did not exit %v after SIGTERM; killing it", pid, stopTimeout)
			_ = syscall.Kill(-pid, syscall.SIGKILL)
			<-p.done
		}
		// Children get SIGTERM from the master; make sure none is left in
		// the master's process group.
		if !waitGroupGone(pid, stopTimeout) {
			_ = syscall.Kill(-pid, syscall.SIGKILL)
			if !waitGroupGone(pid, stopTimeout) {
				p.t.Errorf("testmta: Postfix processes in process group %d survive SIGKILL", pid)
			}
		}
	})
}
