package testmta

import (
	"net"
	"net/textproto"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/emersion/go-milter"
)

// stubMilter is a throw-away milter: at RCPT it answers
// "451 4.7.1 go away 100%% sure" (Sendmail treats the text as a format, so
// the client sees one %) for recipients starting with "deny"; with
// connectReply set it answers that at CONNECT instead.
type stubMilter struct {
	connectReply string

	mu       sync.Mutex
	connects []string // client addresses seen at CONNECT
	rcpts    []string
}

func (s *stubMilter) Connect(host string, family string, port uint16, addr net.IP, m *milter.Modifier) (milter.Response, error) {
	s.mu.Lock()
	s.connects = append(s.connects, addr.String())
	s.mu.Unlock()
	if s.connectReply != "" {
		return milter.NewResponseStr(byte(milter.ActReplyCode), s.connectReply), nil
	}
	return milter.RespContinue, nil
}

func (s *stubMilter) Helo(string, *milter.Modifier) (milter.Response, error) {
	return milter.RespContinue, nil
}

func (s *stubMilter) MailFrom(string, *milter.Modifier) (milter.Response, error) {
	return milter.RespContinue, nil
}

func (s *stubMilter) RcptTo(rcpt string, m *milter.Modifier) (milter.Response, error) {
	s.mu.Lock()
	s.rcpts = append(s.rcpts, rcpt)
	s.mu.Unlock()
	if strings.HasPrefix(strings.Trim(rcpt, "<>"), "deny") {
		return milter.NewResponseStr(byte(milter.ActReplyCode), "451 4.7.1 go away 100%% sure"), nil
	}
	return milter.RespContinue, nil
}

func (s *stubMilter) Header(string, string, *milter.Modifier) (milter.Response, error) {
	return milter.RespContinue, nil
}

func (s *stubMilter) Headers(textproto.MIMEHeader, *milter.Modifier) (milter.Response, error) {
	return milter.RespContinue, nil
}

func (s *stubMilter) BodyChunk([]byte, *milter.Modifier) (milter.Response, error) {
	return milter.RespContinue, nil
}

// Body answers Continue, not Accept: go-milter drops its per-connection
// backend after Accept.
func (s *stubMilter) Body(*milter.Modifier) (milter.Response, error) {
	return milter.RespContinue, nil
}

func (s *stubMilter) Abort(*milter.Modifier) error { return nil }

func (s *stubMilter) seenRcpts() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.rcpts...)
}

func (s *stubMilter) seenConnects() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.connects...)
}

// startStubMilter serves st on 127.0.0.1:0 until the end of the test.
func startStubMilter(t *testing.T, st *stubMilter) string {
	t.Helper()
	l, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &milter.Server{
		NewMilter: func() milter.Milter { return st },
		Protocol:  milter.OptNoBody,
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = srv.Serve(l)
	}()
	// Closing the listener ends Serve. (Server.Close would write a field
	// Serve reads without a lock: a data race under -race.)
	t.Cleanup(func() {
		l.Close()
		<-done
	})
	return l.Addr().String()
}

// sendmailPIDs returns the PIDs of running processes whose command is
// sendmail (as pgrep -a sendmail would list them), zombies excluded.
func sendmailPIDs(t *testing.T) map[string]string {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	r := map[string]string{}
	for _, e := range ents {
		if strings.Trim(e.Name(), "0123456789") != "" {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "stat"))
		if err != nil {
			continue
		}
		st := string(b)
		i, j := strings.IndexByte(st, '('), strings.LastIndexByte(st, ')')
		if i < 0 || j < i || !strings.HasPrefix(st[i+1:j], "sendmail") {
			continue
		}
		if f := strings.Fields(st[j+1:]); len(f) > 0 && (f[0] == "Z" || f[0] == "X") {
			continue
		}
		cmd, _ := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		r[e.Name()] = strings.ReplaceAll(string(cmd), "\x00", " ")
	}
	return r
}

// checkNoNewSendmail fails the test if, at its end, a sendmail process is
// running that was not running at its start.
func checkNoNewSendmail(t *testing.T) {
	t.Helper()
	before := sendmailPIDs(t)
	t.Cleanup(func() {
		// The instances' own cleanups, registered later, have run.
		for pid, cmd := range sendmailPIDs(t) {
			if _, ok := before[pid]; !ok {
				t.Errorf("sendmail process %s left running: %s", pid, cmd)
			}
		}
	})
}

func TestSendmailNoMilter(t *testing.T) {
	checkNoNewSendmail(t)
	start := time.Now()
	sm := StartSendmail(t, SendmailOptions{})
	t.Logf("Sendmail up at %s in %v", sm.Addr(), time.Since(start))

	tr := SendMail(t, sm.Addr(), "127.0.0.6", "a@example.test", []string{"ok@example.test", "someone@elsewhere.example"})
	t.Logf("%s", tr)
	if tr.Err != nil {
		t.Fatalf("session error: %v\n%s", tr.Err, tr)
	}
	if g := tr.Greeting.String(); !strings.HasPrefix(g, "220 "+SendmailHostname+" ESMTP Sendmail 8.17") {
		t.Errorf("greeting %q", g)
	}
	for i, r := range tr.RcptReplies() {
		if r.Code != 250 {
			t.Errorf("RCPT %d: got %q, want 250", i, r)
		}
	}
	if f := tr.Final(); f.Code != 250 || !strings.Contains(f.String(), "Message accepted for delivery") {
		t.Errorf("end of DATA: got %q, want 250 ... Message accepted for delivery\n%s", f, tr)
	}

	// Kept in the queue, never delivered.
	qf, _ := filepath.Glob(filepath.Join(sm.QueueDir(), "qf*"))
	if len(qf) != 1 {
		t.Errorf("queue holds %d qf files, want 1: %v", len(qf), qf)
	}

	// ETRN would run the queue: refused.
	s, err := Session(t, sm.Addr(), "127.0.0.7")
	if err != nil {
		t.Fatal(err)
	}
	if r, err := s.Ehlo("client.example.test"); err != nil || r.Code != 250 || strings.Contains(r.String(), "ETRN") || strings.Contains(r.String(), "AUTH") {
		t.Errorf("EHLO: %q, %v; want 250 without ETRN and AUTH", r, err)
	}
	if r, err := s.Cmd("ETRN example.test"); err != nil || r.Code != 502 {
		t.Errorf("ETRN: got %q, %v; want 502", r, err)
	}
	s.Close()

	// Stop is idempotent and leaves nothing running.
	pid := sm.PID()
	sm.Stop()
	sm.Stop()
	if groupAlive(pid) {
		t.Errorf("processes of the stopped instance (pgid %d) still running", pid)
	}
	if _, err := Session(t, sm.Addr(), ""); err == nil {
		t.Errorf("stopped instance still accepts connections")
	}
}

func TestSendmailMilter(t *testing.T) {
	checkNoNewSendmail(t)
	rcptStub := &stubMilter{}
	connStub := &stubMilter{connectReply: "451 4.7.1 text"}
	start := time.Now()
	// Two instances at once.
	sm := StartSendmail(t, SendmailOptions{MilterAddr: startStubMilter(t, rcptStub)})
	smConn := StartSendmail(t, SendmailOptions{MilterAddr: startStubMilter(t, connStub)})
	t.Logf("two Sendmails up at %s and %s in %v", sm.Addr(), smConn.Addr(), time.Since(start))
	if sm.Addr() == smConn.Addr() || sm.Dir() == smConn.Dir() {
		t.Fatalf("instances share %s / %s", sm.Addr(), sm.Dir())
	}
	if !strings.Contains(sm.MC(), "INPUT_MAIL_FILTER(`policyd', `S=inet:") {
		t.Errorf("no milter in the .mc:\n%s", sm.MC())
	}

	t.Run("rcpt", func(t *testing.T) {
		tr := SendMail(t, sm.Addr(), "127.0.0.6", "a@example.test", []string{"deny@example.test", "ok@example.test"})
		t.Logf("%s", tr)
		if tr.Err != nil {
			t.Fatalf("session error: %v\n%s", tr.Err, tr)
		}
		rr := tr.RcptReplies()
		if len(rr) != 2 {
			t.Fatalf("got %d RCPT replies, want 2\n%s", len(rr), tr)
		}
		if want := "451 4.7.1 go away 100% sure"; rr[0].String() != want {
			t.Errorf("RCPT deny@: got %q, want %q", rr[0], want)
		}
		if rr[1].Code != 250 {
			t.Errorf("RCPT ok@: got %q, want 250", rr[1])
		}
		if f := tr.Final(); f.Code != 250 {
			t.Errorf("end of DATA: got %q, want 250\n%s", f, tr)
		}
		if got := rcptStub.seenRcpts(); len(got) != 2 || !strings.Contains(got[0], "deny@example.test") {
			t.Errorf("milter saw recipients %q", got)
		}
		if !slices.Contains(rcptStub.seenConnects(), "127.0.0.6") {
			t.Errorf("milter saw no connect from 127.0.0.6: %q", rcptStub.seenConnects())
		}
	})

	// Sendmail replaces a connect-stage 4xx of the milter with its own
	// text, given at MAIL FROM; the product works around this.
	t.Run("connect", func(t *testing.T) {
		tr := SendMail(t, smConn.Addr(), "127.0.0.6", "a@example.test", []string{"ok@example.test"})
		t.Logf("%s", tr)
		if tr.Err != nil {
			t.Fatalf("session error: %v\n%s", tr.Err, tr)
		}
		if tr.Greeting.Code != 220 || tr.Reply("EHLO").Code != 250 {
			t.Errorf("want 220 greeting and 250 to EHLO\n%s", tr)
		}
		if got, want := tr.Reply("MAIL").String(), "451 4.3.2 Please try again later"; got != want {
			t.Errorf("MAIL FROM: got %q, want %q\n%s", got, want, tr)
		}
		if len(tr.RcptReplies()) != 0 || tr.Final().Code != 0 {
			t.Errorf("session went on after MAIL FROM was refused\n%s", tr)
		}
		if !slices.Contains(connStub.seenConnects(), "127.0.0.6") {
			t.Errorf("milter saw no connect from 127.0.0.6: %q", connStub.seenConnects())
		}
	})
}

// A long test name makes t.TempDir() long; the instance uses a short
// directory of its own.
func TestSendmailLongTestName(t *testing.T) {
	checkNoNewSendmail(t)
	t.Run(strings.Repeat("a_rather_long_subtest_name_", 4), func(t *testing.T) {
		sm := StartSendmail(t, SendmailOptions{})
		if len(sm.Dir()) > 60 {
			t.Errorf("instance directory %s is too long", sm.Dir())
		}
		tr := SendMail(t, sm.Addr(), "127.0.0.8", "a@example.test", []string{"ok@example.test"})
		if tr.Err != nil || tr.Final().Code != 250 {
			t.Errorf("want 250 at end of DATA\n%s", tr)
		}
	})
}

func TestSendmailMCMilterLine(t *testing.T) {
	mc, err := sendmailMC("/tmp/x", 2525, SendmailOptions{MilterAddr: "127.0.0.1:10041", MilterFlags: DefaultSendmailMilterFlags})
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"INPUT_MAIL_FILTER(`policyd', `S=inet:10041@127.0.0.1, F=T, T=C:10s;S:10s;R:10s;E:30s')dnl\n",
		"DAEMON_OPTIONS(`Port=2525, Addr=127.0.0.1, Name=MTA, Family=inet')dnl\n",
		"define(`QUEUE_DIR', `/tmp/x/queue')dnl\n",
	} {
		if !strings.Contains(mc, want) {
			t.Errorf(".mc lacks %q:\n%s", want, mc)
		}
	}
	mc, err = sendmailMC("/tmp/x", 2525, SendmailOptions{MilterAddr: "[::1]:10041", MilterFlags: "F=R"})
	if err != nil || !strings.Contains(mc, "`S=inet6:10041@::1, F=R'") {
		t.Errorf("IPv6 milter: %v\n%s", err, mc)
	}
	if _, err := sendmailMC("/tmp/x", 2525, SendmailOptions{MilterAddr: "nope"}); err == nil {
		t.Errorf("bad MilterAddr accepted")
	}
	if _, err := sendmailMC("/tmp/a b", 2525, SendmailOptions{}); err == nil {
		t.Errorf("directory with a space accepted")
	}
}
