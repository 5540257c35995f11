package rules_test

import (
	"context"
	"strings"
	"testing"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/rules/rulestest"
)

// The session model both front-ends share: each step is one SMTP event;
// the probe rule records what runs.
func TestConversation(t *testing.T) {
	ctx := context.Background()
	type step func(s *rules.Conversation) rules.Decision
	connect := func(s *rules.Conversation) rules.Decision { return s.Connect(ctx) }
	helo := func(name string) step { return func(s *rules.Conversation) rules.Decision { return s.Helo(ctx, name) } }
	mail := func(from string) step {
		return func(s *rules.Conversation) rules.Decision { return s.Mail(ctx, rules.MailFrom{Sender: from}) }
	}
	rcpt := func(to string) step { return func(s *rules.Conversation) rules.Decision { return s.Rcpt(ctx, to) } }
	data := func(s *rules.Conversation) rules.Decision { return s.Data(ctx) }
	eom := func(s *rules.Conversation) rules.Decision { return s.DataPost(ctx) }
	rset := func(s *rules.Conversation) rules.Decision { s.Reset(ctx); return rules.Decision{} }
	end := func(s *rules.Conversation) rules.Decision { s.End(ctx); return rules.Decision{} }

	tests := []struct {
		name    string
		plugins string
		steps   []step
		answers string // per step: - for no refusal, else the answer
		calls   string
	}{
		{"a whole session, two messages", "probe",
			[]step{connect, helo("a"), mail("x"), rcpt("r1"), rcpt("r2"), data, eom, mail("y"), rcpt("r3"), eom, end, end},
			"- - - - - - - - - - - -",
			"connect helo mail rcpt rcpt data data_post reset_transaction mail rcpt data data_post reset_transaction disconnect"},
		{"connect refusal holds for the session, hooks do not run", "probe answer DENYSOFT",
			[]step{connect, connect, helo("a"), mail("x"), rcpt("r"), data, eom, end},
			"DENYSOFT DENYSOFT DENYSOFT DENYSOFT DENYSOFT DENYSOFT DENYSOFT -",
			"connect deny-observer disconnect"},
		{"mail refusal holds for its transaction only", "probe:0\nprobe:1 at mail answer DENY",
			[]step{connect, helo("a"), mail("x"), rcpt("r"), rset, mail("y")},
			"- - DENY DENY - DENY",
			"probe:0 connect probe:1 connect probe:0 helo probe:1 helo probe:0 mail probe:1 mail probe:0 deny-observer probe:1 deny-observer probe:0 reset_transaction probe:1 reset_transaction probe:0 mail probe:1 mail probe:0 deny-observer probe:1 deny-observer"},
		{"without MAIL there is no transaction", "probe",
			[]step{connect, rcpt("r"), data, eom, rset, end},
			"- - - - - -",
			"connect disconnect"},
		{"data runs once, even when the end of message runs it", "probe",
			[]step{connect, mail("x"), rcpt("r"), data, data, eom},
			"- - - - - -",
			"connect mail rcpt data data_post reset_transaction"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := rulestest.New(t, tc.plugins, nil)
			takeCalls()
			s := h.Session("192.0.2.1")
			var answers []string
			for _, st := range tc.steps {
				d := st(s)
				if d.Refuses() {
					answers = append(answers, d.Code.String())
				} else {
					answers = append(answers, "-")
				}
			}
			if got := strings.Join(answers, " "); got != tc.answers {
				t.Errorf("answers %q, want %q", got, tc.answers)
			}
			var calls []string
			single := !strings.Contains(tc.plugins, ":")
			for _, c := range takeCalls() {
				f := strings.Fields(c)
				if single {
					f = f[1:]
				}
				if len(f) > 2 && f[1] == "deny-observer" || single && len(f) > 1 && f[0] == "deny-observer" {
					f = f[:len(f)-3] // drop the decision details
				}
				calls = append(calls, strings.Join(f, " "))
			}
			if got := strings.Join(calls, " "); got != tc.calls {
				t.Errorf("calls:\n%s\nwant:\n%s", got, tc.calls)
			}
		})
	}
}
