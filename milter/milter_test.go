package milter_test

import (
	"context"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	gomilter "github.com/emersion/go-milter"

	"github.com/policyd-mail/policyd/internal/testing/frontendtest"
	"github.com/policyd-mail/policyd/milter"
	"github.com/policyd-mail/policyd/rules"
	_ "github.com/policyd-mail/policyd/rules/all"
	"github.com/policyd-mail/policyd/rules/rulestest"
)

// probe answers one hook as configured and records every hook it sees
// with the session data the rules would see.
type probe struct {
	at     string
	answer rules.Code
	text   string
}

var (
	eventsMu sync.Mutex
	events   []string
	eventsCh = make(chan struct{}, 1000)
)

func record(e string) {
	eventsMu.Lock()
	events = append(events, e)
	eventsMu.Unlock()
	eventsCh <- struct{}{}
}

func takeEvents() []string {
	eventsMu.Lock()
	defer eventsMu.Unlock()
	out := events
	events = nil
	for len(eventsCh) > 0 {
		<-eventsCh
	}
	return out
}

// waitEvent blocks until an event containing s was recorded.
func waitEvent(t *testing.T, s string) {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		eventsMu.Lock()
		for _, e := range events {
			if strings.Contains(e, s) {
				eventsMu.Unlock()
				return
			}
		}
		eventsMu.Unlock()
		select {
		case <-eventsCh:
		case <-deadline:
			t.Fatalf("no event %q in %v", s, takeEvents())
		}
	}
}

func init() {
	rules.Register(rules.Definition{Name: "mprobe", Setup: func(b *rules.Binder, _ rules.Env) (any, error) {
		p := &probe{at: b.String("at", ""), text: b.String("say", "")}
		switch b.String("answer", "DENYSOFT") {
		case "DENY":
			p.answer = rules.Deny
		case "DENYSOFT":
			p.answer = rules.DenySoft
		case "DENY_DISCONNECT":
			p.answer = rules.DenyDisconnect
		case "DENYSOFT_DISCONNECT":
			p.answer = rules.DenySoftDisconnect
		}
		return &rulestest.Recorder{Answer: p.hook}, nil
	}})
}

func (p *probe) hook(h rules.Hook, s *rules.Session) (rules.Result, error) {
	var qid, sender, rcpt string
	if s.Txn != nil {
		qid, sender, rcpt = s.Txn.QueueID, s.Txn.Sender, s.Txn.Rcpt
	}
	record(fmt.Sprintf("%s client=%s helo=%s qid=%s from=%s rcpt=%s auth=%s", h, s.Client, s.Helo, qid, sender, rcpt, s.AuthUser))
	if h.String() == p.at {
		return rules.Decided(p.answer, p.text), nil
	}
	return rules.Result{}, nil
}

// serve runs the milter front-end on the harness's chain.
func serve(t *testing.T, h *rulestest.Harness, cfg milter.Config) (*milter.Server, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Clock = h.Clock
	srv := milter.New(cfg, func() *rules.Chain { return h.Chain })
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return srv, ln.Addr().String()
}

// mta is an MTA-side milter session made with go-milter's client, which
// must offer no more than protocol v2's masks to talk to a v2 server.
func mta(t *testing.T, addr string) *gomilter.ClientSession {
	t.Helper()
	return frontendtest.MTA(t, addr)
}

func reply(a *gomilter.Action, err error) string {
	if err != nil {
		return "error: " + err.Error()
	}
	if a.Code == gomilter.ActReplyCode {
		return fmt.Sprintf("%d %s", a.SMTPCode, a.SMTPText)
	}
	return string(rune(a.Code))
}

// session plays one SMTP session through the milter and returns the
// reply at each step.
func session(t *testing.T, addr, ip string, rcpts ...string) []string {
	t.Helper()
	s := mta(t, addr)
	defer s.Close()
	var out []string
	s.Macros(gomilter.CodeConn, "j", "mx.example.test", "{daemon_name}", "smtpd")
	out = append(out, "connect "+reply(s.Conn("client.example", gomilter.FamilyInet, 4000, ip)))
	out = append(out, "helo "+reply(s.Helo("client.example")))
	s.Macros(gomilter.CodeMail, "i", "QID1", "{auth_authen}", "alice")
	out = append(out, "mail "+reply(s.Mail("<s@example.org>", nil)))
	for _, r := range rcpts {
		out = append(out, "rcpt "+reply(s.Rcpt("<"+r+">", nil)))
	}
	out = append(out, "eoh "+reply(s.HeaderEnd()))
	_, act, err := s.End()
	out = append(out, "eom "+reply(act, err))
	return out
}

// A refusal holds as an SMTP server's would: a real MTA sends nothing
// more of a refused stage, but if it did, it would get the refusal again.
func TestHooksAndReplies(t *testing.T) {
	tests := []struct {
		name    string
		plugins string
		want    []string
	}{
		{"everything passes", "mprobe",
			[]string{"connect c", "helo c", "mail c", "rcpt c", "eoh c", "eom c"}},
		{"DENYSOFT at rcpt is 451 4.7.1", `mprobe at rcpt answer DENYSOFT say "slow down"`,
			[]string{"connect c", "helo c", "mail c", "rcpt 451 4.7.1 slow down", "eoh c", "eom c"}},
		{"DENY at mail is 550 5.7.1, percent doubled", `mprobe at mail answer DENY say "100% spam"`,
			[]string{"connect c", "helo c", "mail 550 5.7.1 100%% spam", "rcpt 550 5.7.1 100%% spam", "eoh 550 5.7.1 100%% spam", "eom 550 5.7.1 100%% spam"}},
		{"connect refusal is held until HELO", `mprobe at connect answer DENYSOFT say "too many"`,
			[]string{"connect c", "helo 451 4.7.1 too many", "mail 451 4.7.1 too many", "rcpt 451 4.7.1 too many", "eoh 451 4.7.1 too many", "eom 451 4.7.1 too many"}},
		{"DENY_DISCONNECT at connect is 421", `mprobe at connect answer DENY_DISCONNECT say bye`,
			[]string{"connect 421 4.7.0 bye"}},
		{"DENY_DISCONNECT at helo is 421", `mprobe at helo answer DENY_DISCONNECT say bye`,
			[]string{"connect c", "helo 421 4.7.0 bye"}},
		{"DENY_DISCONNECT at rcpt is 521", `mprobe at rcpt answer DENY_DISCONNECT say bye`,
			[]string{"connect c", "helo c", "mail c", "rcpt 521 5.7.1 bye"}},
		{"DENYSOFT_DISCONNECT at mail is 421", `mprobe at mail answer DENYSOFT_DISCONNECT say bye`,
			[]string{"connect c", "helo c", "mail 421 4.7.0 bye"}},
		{"data refusal at end of headers", `mprobe at data answer DENY say "no data"`,
			[]string{"connect c", "helo c", "mail c", "rcpt c", "eoh 550 5.7.1 no data", "eom 550 5.7.1 no data"}},
		{"data_post refusal at end of message", `mprobe at data_post answer DENYSOFT say later`,
			[]string{"connect c", "helo c", "mail c", "rcpt c", "eoh c", "eom 451 4.7.1 later"}},
		{"code override kept", `mprobe at rcpt answer DENYSOFT code 450 say x`,
			[]string{"connect c", "helo c", "mail c", "rcpt 450 4.7.1 x", "eoh c", "eom c"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := rulestest.New(t, tc.plugins, nil)
			_, addr := serve(t, h, milter.Config{})
			got := session(t, addr, "192.0.2.1", "r@example.test")
			if len(got) > len(tc.want) {
				got = got[:len(tc.want)]
			}
			if strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
				t.Errorf("got:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
			takeEvents()
		})
	}
}

// The rules see the same session behind the milter as behind the policy
// front-end: client, helo, queue id from the MAIL-stage macros, sender,
// recipient, SASL user; reset at the end of each message; disconnect at
// close.
func TestSessionModel(t *testing.T) {
	h := rulestest.New(t, "mprobe", nil)
	_, addr := serve(t, h, milter.Config{})
	takeEvents()
	s := mta(t, addr)
	s.Macros(gomilter.CodeConn, "j", "mx.example.test")
	s.Conn("client.example", gomilter.FamilyInet6, 4000, "2001:db8::7")
	s.Helo("client.example")
	// message 1, with macros arriving late (at RCPT)
	s.Mail("<a@example.org>", nil)
	s.Macros(gomilter.CodeRcpt, "i", "Q1", "{rcpt_addr}", "r1@example.test")
	s.Rcpt("<r1@example.test>", nil)
	s.HeaderEnd()
	s.End()
	// message 2, aborted after RCPT (RSET)
	s.Macros(gomilter.CodeMail, "i", "Q2", "{auth_authen}", "bob")
	s.Mail("<b@example.org>", nil)
	s.Rcpt("<r2@example.test>", nil)
	s.Abort()
	// message 3
	s.Mail("<c@example.org>", nil)
	s.Rcpt("<r3@example.test>", nil)
	s.End()
	s.Close()
	waitEvent(t, "disconnect")
	want := []string{
		"connect client=2001:db8::7 helo= qid= from= rcpt= auth=",
		"helo client=2001:db8::7 helo=client.example qid= from= rcpt= auth=",
		"mail client=2001:db8::7 helo=client.example qid= from=a@example.org rcpt= auth=",
		"rcpt client=2001:db8::7 helo=client.example qid=Q1 from=a@example.org rcpt=r1@example.test auth=",
		"data client=2001:db8::7 helo=client.example qid=Q1 from=a@example.org rcpt=r1@example.test auth=",
		"data_post client=2001:db8::7 helo=client.example qid=Q1 from=a@example.org rcpt=r1@example.test auth=",
		"reset_transaction client=2001:db8::7 helo=client.example qid=Q1 from=a@example.org rcpt=r1@example.test auth=",
		"mail client=2001:db8::7 helo=client.example qid=Q2 from=b@example.org rcpt= auth=bob",
		"rcpt client=2001:db8::7 helo=client.example qid=Q2 from=b@example.org rcpt=r2@example.test auth=bob",
		"reset_transaction client=2001:db8::7 helo=client.example qid=Q2 from=b@example.org rcpt=r2@example.test auth=bob",
		"mail client=2001:db8::7 helo=client.example qid=Q2 from=c@example.org rcpt= auth=bob",
		"rcpt client=2001:db8::7 helo=client.example qid=Q2 from=c@example.org rcpt=r3@example.test auth=bob",
		"data client=2001:db8::7 helo=client.example qid=Q2 from=c@example.org rcpt=r3@example.test auth=bob",
		"data_post client=2001:db8::7 helo=client.example qid=Q2 from=c@example.org rcpt=r3@example.test auth=bob",
		"reset_transaction client=2001:db8::7 helo=client.example qid=Q2 from=c@example.org rcpt=r3@example.test auth=bob",
		"disconnect client=2001:db8::7 helo=client.example qid= from= rcpt= auth=bob",
	}
	if got := takeEvents(); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("got:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

// connection_shaper counts milter connections: sessions 1–3 pass, the 4th
// is refused at HELO with the rule's text, another client passes.
func TestConnectionShaperBehindMilter(t *testing.T) {
	h := rulestest.New(t, "connection_shaper threshold 3", nil)
	_, addr := serve(t, h, milter.Config{})
	for i := 1; i <= 3; i++ {
		if got := session(t, addr, "192.0.2.1", "a@example.test", "b@example.test"); strings.Join(got, ",") != "connect c,helo c,mail c,rcpt c,rcpt c,eoh c,eom c" {
			t.Fatalf("session %d: %v", i, got)
		}
	}
	got := session(t, addr, "192.0.2.1", "a@example.test")
	if got[1] != "helo 451 4.7.1 Too many connections from your address (more than 3 in 1m0s), please try again later" {
		t.Fatalf("4th session: %v", got)
	}
	if got := session(t, addr, "192.0.2.2", "a@example.test"); got[3] != "rcpt c" {
		t.Fatalf("other client: %v", got)
	}
}
