package testmta

import (
	"bufio"
	"net"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// stubPolicy is a throw-away policy delegation server: it reads name=value
// lines up to an empty line and answers DUNNO, or 450 for recipients
// starting with "deny".
type stubPolicy struct {
	l        net.Listener
	mu       sync.Mutex
	requests []map[string]string
	wg       sync.WaitGroup
}

func newStubPolicy(t *testing.T) *stubPolicy {
	t.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &stubPolicy{l: l}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				s.serve(c)
			}()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		s.wg.Wait()
	})
	return s
}

func (s *stubPolicy) serve(c net.Conn) {
	defer c.Close()
	r := bufio.NewReader(c)
	req := map[string]string{}
	for {
		_ = c.SetDeadline(time.Now().Add(30 * time.Second))
		line, err := r.ReadString('\n')
		if err != nil {
			return
		}
		line = strings.TrimRight(line, "\r\n")
		if line != "" {
			k, v, _ := strings.Cut(line, "=")
			req[k] = v
			continue
		}
		s.mu.Lock()
		s.requests = append(s.requests, req)
		s.mu.Unlock()
		answer := "action=DUNNO\n\n"
		if strings.HasPrefix(req["recipient"], "deny") {
			answer = "action=450 4.7.1 go away\n\n"
		}
		if _, err := c.Write([]byte(answer)); err != nil {
			return
		}
		req = map[string]string{}
	}
}

func (s *stubPolicy) Addr() string { return s.l.Addr().String() }

// find returns the requests seen for recipient rcpt.
func (s *stubPolicy) find(rcpt string) []map[string]string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var r []map[string]string
	for _, q := range s.requests {
		if q["recipient"] == rcpt {
			r = append(r, q)
		}
	}
	return r
}

// On Linux all of 127.0.0.0/8 is routed to lo: binding any 127.0.0.N as
// source works without configuring an alias.
func TestLoopbackSourceAddresses(t *testing.T) {
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for _, src := range []string{"127.0.0.2", "127.0.0.3", "127.0.0.4", "127.1.2.3"} {
		d := net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(src)}, Timeout: 5 * time.Second}
		c, err := d.Dial("tcp", l.Addr().String())
		if err != nil {
			t.Fatalf("dial from %s: %v", src, err)
		}
		sc, err := l.Accept()
		if err != nil {
			t.Fatal(err)
		}
		if got := sc.RemoteAddr().(*net.TCPAddr).IP.String(); got != src {
			t.Errorf("server saw %s, want %s", got, src)
		}
		sc.Close()
		c.Close()
	}
}

func TestPolicyEndToEnd(t *testing.T) {
	pol := newStubPolicy(t)
	start := time.Now()
	pf := Start(t, Options{PolicyAddr: pol.Addr()})
	t.Logf("Postfix up at %s in %v", pf.Addr(), time.Since(start))

	tr := SendMail(t, pf.Addr(), "127.0.0.2", "a@example.test", []string{"ok@example.test", "deny@example.test"})
	t.Logf("%s", tr)
	if tr.Err != nil {
		t.Fatalf("session error: %v\n%s", tr.Err, tr)
	}
	rr := tr.RcptReplies()
	if len(rr) != 2 {
		t.Fatalf("got %d RCPT replies, want 2\n%s", len(rr), tr)
	}
	if rr[0].Code != 250 {
		t.Errorf("RCPT ok@: got %q, want 250\n%s", rr[0], tr)
	}
	if rr[1].Code != 450 || !strings.Contains(rr[1].Text(), "4.7.1") || !strings.Contains(rr[1].Text(), "go away") {
		t.Errorf("RCPT deny@: got %q, want 450 4.7.1 ... go away\n%s", rr[1], tr)
	}
	if want := "450 4.7.1 <deny@example.test>: Recipient address rejected: go away"; rr[1].String() != want {
		t.Errorf("RCPT deny@: got %q, want %q", rr[1], want)
	}
	if f := tr.Final(); f.Code != 250 {
		t.Errorf("end of DATA: got %q, want 250\n%s", f, tr)
	}

	for _, rcpt := range []string{"ok@example.test", "deny@example.test"} {
		reqs := pol.find(rcpt)
		if len(reqs) == 0 {
			t.Fatalf("policy server saw no request for %s", rcpt)
		}
		q := reqs[0]
		if q["request"] != "smtpd_access_policy" || q["protocol_state"] != "RCPT" {
			t.Errorf("request for %s: request=%q protocol_state=%q, want smtpd_access_policy/RCPT", rcpt, q["request"], q["protocol_state"])
		}
		if q["client_address"] != "127.0.0.2" {
			t.Errorf("request for %s: client_address=%q, want 127.0.0.2", rcpt, q["client_address"])
		}
		if p, err := strconv.Atoi(q["client_port"]); err != nil || p <= 0 {
			t.Errorf("request for %s: client_port=%q, want a port number", rcpt, q["client_port"])
		}
		if q["sender"] != "a@example.test" {
			t.Errorf("request for %s: sender=%q", rcpt, q["sender"])
		}
	}

	// A hand-driven session from 127.0.0.3.
	s, err := Session(t, pf.Addr(), "127.0.0.3")
	if err != nil {
		t.Fatal(err)
	}
	if g := s.Greeting(); g.Code != 220 || !strings.Contains(g.String(), "mta.example.test") {
		t.Errorf("greeting %q", g)
	}
	want := func(code int) func(Reply, error) Reply {
		return func(r Reply, err error) Reply {
			t.Helper()
			if err != nil {
				t.Fatal(err)
			}
			if r.Code != code {
				t.Fatalf("got %q, want %d", r, code)
			}
			return r
		}
	}
	ehlo := want(250)(s.Ehlo("three.example.test"))
	if len(ehlo.Lines) < 2 || !strings.HasPrefix(ehlo.Lines[0], "250-") {
		t.Errorf("EHLO reply is not multi-line: %q", ehlo.Lines)
	}
	want(250)(s.Mail("b@example.test"))
	want(450)(s.Rcpt("deny-three@example.test"))
	want(250)(s.Rcpt("ok3@example.test"))
	want(250)(s.Data("Subject: three\n\n.leading dot\nbody\n"))
	want(221)(s.Quit())
	s.Close()
	reqs := pol.find("ok3@example.test")
	if len(reqs) != 1 || reqs[0]["client_address"] != "127.0.0.3" {
		t.Errorf("policy requests for ok3@: %v", reqs)
	}

	// swaks from 127.0.0.4.
	_, port, _ := net.SplitHostPort(pf.Addr())
	out, err := Swaks(t, "--server", "127.0.0.1", "--port", port, "--local-interface", "127.0.0.4",
		"--to", "ok@example.test", "--from", "a@example.test", "--helo", "swaks.example.test")
	if err != nil {
		t.Fatalf("swaks: %v\n%s", err, out)
	}
	if !strings.Contains(out, "<-  250 2.0.0 Ok: queued") {
		t.Errorf("swaks output lacks the 250 queued reply:\n%s", out)
	}
	if reqs := pol.find("ok@example.test"); len(reqs) < 2 || reqs[len(reqs)-1]["client_address"] != "127.0.0.4" {
		t.Errorf("policy requests for ok@ after swaks: %v", reqs)
	}

	// The message was received and discarded.
	if l, ok := pf.WaitMaillog(10*time.Second, "to=<ok3@example.test>", "status=sent"); !ok {
		t.Errorf("no discard delivery of ok3@ in the maillog")
	} else if !strings.Contains(l, "discard[") {
		t.Errorf("ok3@ not delivered by discard: %s", l)
	}
}

// Unreachable policy server and milter: the configured default actions
// apply, and two instances run side by side.
func TestUnavailableServices(t *testing.T) {
	dead := func() string {
		l, err := net.Listen("tcp4", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return l.Addr().String()
	}
	polDown := Start(t, Options{PolicyAddr: dead()})
	milterDown := Start(t, Options{MilterAddr: dead()})
	if polDown.Addr() == milterDown.Addr() || polDown.Dir() == milterDown.Dir() {
		t.Fatalf("instances share %s / %s", polDown.Addr(), polDown.Dir())
	}

	tr := SendMail(t, polDown.Addr(), "127.0.0.5", "a@example.test", []string{"ok@example.test"})
	if rr := tr.RcptReplies(); len(rr) != 1 || rr[0].String() != "451 4.3.5 <ok@example.test>: Recipient address rejected: policy unavailable" {
		t.Errorf("policy down: want 451 4.3.5 policy unavailable\n%s", tr)
	}

	tr = SendMail(t, milterDown.Addr(), "127.0.0.6", "a@example.test", []string{"ok@example.test"})
	t.Logf("milter down:\n%s", tr)
	if got := tr.Reply("MAIL").String(); got != "451 4.7.1 Service unavailable - try again later" || len(tr.RcptReplies()) != 0 || tr.Final().Code != 0 {
		t.Errorf("milter down: want 451 4.7.1 tempfail at MAIL FROM\n%s", tr)
	}

	// Stop is idempotent and leaves nothing running.
	pid := polDown.cmd.Process.Pid
	polDown.Stop()
	polDown.Stop()
	if groupAlive(pid) {
		t.Errorf("processes of stopped instance (pgid %d) still running", pid)
	}
	if _, err := Session(t, polDown.Addr(), ""); err == nil {
		t.Errorf("stopped instance still accepts connections")
	}
}

// A long test name makes t.TempDir() too long for Postfix's UNIX-domain
// socket paths; Start then uses a short directory of its own.
func TestLongTestName(t *testing.T) {
	t.Run(strings.Repeat("a_rather_long_subtest_name_", 4), func(t *testing.T) {
		pf := Start(t, Options{})
		if len(pf.Dir()) > 60 {
			t.Errorf("instance directory %s is too long", pf.Dir())
		}
		tr := SendMail(t, pf.Addr(), "127.0.0.7", "a@example.test", []string{"ok@example.test"})
		if tr.Err != nil || tr.Final().Code != 250 {
			t.Errorf("want 250 at end of DATA\n%s", tr)
		}
	})
}

func TestDotStuff(t *testing.T) {
	got := dotStuff("Subject: x\n\n.one\r\n..two\nthree")
	want := "Subject: x\r\n\r\n..one\r\n...two\r\nthree\r\n"
	if got != want {
		t.Errorf("dotStuff: got %q, want %q", got, want)
	}
}

func TestReadReply(t *testing.T) {
	c, srv := net.Pipe()
	defer c.Close()
	defer srv.Close()
	go func() {
		_, _ = srv.Write([]byte("250-first\r\n250-second\r\n250 last\r\n550 5.1.1 nope\r\n251-x\r\n252 y\r\n"))
	}()
	s := &SMTP{conn: c, r: newReader(c)}
	r, err := s.readReply()
	if err != nil || r.Code != 250 || len(r.Lines) != 3 || r.String() != "250-first\n250-second\n250 last" || r.Text() != "first\nsecond\nlast" {
		t.Errorf("multi-line: %#v, %v", r, err)
	}
	r, err = s.readReply()
	if err != nil || r.Code != 550 || !r.Perm() || r.Text() != "5.1.1 nope" {
		t.Errorf("single line: %#v, %v", r, err)
	}
	if r, err = s.readReply(); err == nil {
		t.Errorf("code change within a reply accepted: %#v", r)
	}
}

// Extra settings replace the ones Start writes instead of repeating them
// (Postfix warns about each duplicate at every start), continuation lines
// stay with their parameter, and new ones are appended.
func TestMergeMainCF(t *testing.T) {
	base := "# head\nmynetworks = 127.0.0.0/8\nrelay_domains =\nsmtpd_milters =\n"
	got := mergeMainCF(base, []string{"mynetworks = 127.0.0.1/32", "smtpd_recipient_restrictions =", "    check_policy_service inet:127.0.0.1:1", "relay_domains = example.test"})
	want := "# head\nmynetworks = 127.0.0.1/32\nrelay_domains = example.test\nsmtpd_milters =\n\n# Options.ExtraMainCF\nsmtpd_recipient_restrictions =\n    check_policy_service inet:127.0.0.1:1\n"
	if got != want {
		t.Errorf("mergeMainCF =\n%s\nwant\n%s", got, want)
	}
	for _, name := range []string{"mynetworks", "relay_domains"} {
		if n := strings.Count(got, "\n"+name+" ="); n != 1 {
			t.Errorf("%s set %d times", name, n)
		}
	}
}
