package rules_test

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"testing/fstest"
	"time"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/rules/rulestest"
	"github.com/policyd-mail/policyd/store"
)

// probe is a test rule whose answer comes from its settings, and which
// records every call it gets.
type probe struct {
	name   string
	at     string // answer only at this hook; all hooks when empty
	answer rules.Code
	text   string
	panics bool
	fails  bool
	delay  time.Duration
}

var (
	callsMu sync.Mutex
	calls   []string
)

func record(format string, args ...any) {
	callsMu.Lock()
	calls = append(calls, fmt.Sprintf(format, args...))
	callsMu.Unlock()
}

func takeCalls() []string {
	callsMu.Lock()
	defer callsMu.Unlock()
	out := calls
	calls = nil
	return out
}

func init() {
	rules.Register(rules.Definition{Name: "probe", Setup: func(b *rules.Binder, env rules.Env) (any, error) {
		p := &probe{name: env.Name, text: b.String("say", ""), at: b.String("at", "")}
		switch a := b.String("answer", "DECLINED"); a {
		case "DECLINED":
		case "OK":
			p.answer = rules.OK
		case "DONE":
			p.answer = rules.Done
		case "DENY":
			p.answer = rules.Deny
		case "DENYSOFT":
			p.answer = rules.DenySoft
		case "DENY_DISCONNECT":
			p.answer = rules.DenyDisconnect
		case "DENYSOFT_DISCONNECT":
			p.answer = rules.DenySoftDisconnect
		default:
			b.Errorf("answer %q unknown", a)
		}
		p.delay = b.Duration("delay", 0, 0, time.Hour)
		p.panics = b.Bool("panic", false)
		p.fails = b.Bool("fail", false)
		return p, nil
	}})
}

func (p *probe) answerFor(h rules.Hook) (rules.Result, error) {
	record("%s %s", p.name, h)
	if p.panics {
		panic("probe exploded")
	}
	if p.fails {
		return rules.Result{}, fmt.Errorf("probe: %w", store.ErrUnavailable)
	}
	if p.at != "" && p.at != h.String() {
		return rules.Result{}, nil
	}
	r := rules.Decided(p.answer, p.text)
	r.Delay = p.delay
	return r, nil
}

func (p *probe) Helo(_ context.Context, _ *rules.Session) (rules.Result, error) {
	return p.answerFor(rules.HookHelo)
}

func (p *probe) Mail(_ context.Context, _ *rules.Session) (rules.Result, error) {
	return p.answerFor(rules.HookMail)
}

func (p *probe) Data(_ context.Context, _ *rules.Session) (rules.Result, error) {
	return p.answerFor(rules.HookData)
}

func (p *probe) DataPost(_ context.Context, _ *rules.Session) (rules.Result, error) {
	return p.answerFor(rules.HookDataPost)
}

func (p *probe) ResetTransaction(_ context.Context, _ *rules.Session) error {
	_, err := p.answerFor(rules.HookResetTransaction)
	return err
}

func (p *probe) Connect(_ context.Context, _ *rules.Session) (rules.Result, error) {
	return p.answerFor(rules.HookConnect)
}

func (p *probe) Rcpt(_ context.Context, _ *rules.Session) (rules.Result, error) {
	return p.answerFor(rules.HookRcpt)
}

func (p *probe) Disconnect(_ context.Context, _ *rules.Session) error {
	_, err := p.answerFor(rules.HookDisconnect)
	return err
}

func (p *probe) OnDeny(_ context.Context, _ *rules.Session, d rules.Decision) error {
	record("%s deny-observer %s %s %s", p.name, d.Hook, d.Rule, d.Code)
	return nil
}

func (p *probe) OnOK(_ context.Context, _ *rules.Session, d rules.Decision) error {
	record("%s ok-observer %s %s %s", p.name, d.Hook, d.Rule, d.Code)
	return nil
}

func TestRun(t *testing.T) {
	tests := []struct {
		name      string
		plugins   string
		opts      rulestest.Options
		hook      rules.Hook
		wantCode  rules.Code
		wantRule  string
		wantReply string
		wantDry   bool
		wantCalls []string
		wantLogs  int
	}{
		{
			name:      "every rule declines",
			plugins:   "probe:0\nprobe:1",
			wantCalls: []string{"probe:0 connect", "probe:1 connect"},
		},
		{
			name:      "first answer other than DECLINED wins and ends the hook",
			plugins:   "probe:0\nprobe:1 answer DENYSOFT say slow\nprobe:2 answer DENY",
			wantCode:  rules.DenySoft,
			wantRule:  "probe:1",
			wantReply: "450 4.7.1 slow",
			wantCalls: []string{"probe:0 connect", "probe:1 connect", "probe:0 deny-observer connect probe:1 DENYSOFT", "probe:1 deny-observer connect probe:1 DENYSOFT", "probe:2 deny-observer connect probe:1 DENYSOFT"},
			wantLogs:  1,
		},
		{
			name:      "OK skips the rest of the hook and fires the ok observers",
			plugins:   "probe:0 answer OK\nprobe:1 answer DENY",
			wantCode:  rules.OK,
			wantRule:  "probe:0",
			wantCalls: []string{"probe:0 connect", "probe:0 ok-observer connect probe:0 OK", "probe:1 ok-observer connect probe:0 OK"},
			wantLogs:  1,
		},
		{
			name:      "DONE skips the rest too",
			plugins:   "probe:0 answer DONE\nprobe:1 answer DENY",
			wantCode:  rules.Done,
			wantRule:  "probe:0",
			wantCalls: []string{"probe:0 connect", "probe:0 ok-observer connect probe:0 DONE", "probe:1 ok-observer connect probe:0 DONE"},
			wantLogs:  1,
		},
		{
			name:      "a panicking rule is recovered and skipped (fail-open)",
			plugins:   "probe:0 panic 1\nprobe:1 answer DENY say no",
			wantCode:  rules.Deny,
			wantRule:  "probe:1",
			wantReply: "550 5.7.1 no",
			wantCalls: []string{"probe:0 connect", "probe:1 connect", "probe:0 deny-observer connect probe:1 DENY", "probe:1 deny-observer connect probe:1 DENY"},
			wantLogs:  2, // the panic and the decision
		},
		{
			name:      "a store error is skipped by default",
			plugins:   "probe:0 fail 1\nprobe:1",
			wantCalls: []string{"probe:0 connect", "probe:1 connect"},
			wantLogs:  1, // the warning
		},
		{
			name:      "a store error tempfails when asked to",
			plugins:   "probe:0 fail 1 text ignored\nprobe:1",
			opts:      rulestest.Options{OnStoreError: rules.FailTempfail},
			wantCode:  rules.DenySoft,
			wantRule:  "probe:0",
			wantReply: "450 4.7.1 Policy service temporarily unavailable, please try again later",
			wantCalls: []string{"probe:0 connect", "probe:0 deny-observer connect probe:0 DENYSOFT", "probe:1 deny-observer connect probe:0 DENYSOFT"},
			wantLogs:  2,
		},
		{
			name:      "code and text overrides of the same class apply",
			plugins:   `probe answer DENY say original code 554 text "Go away"`,
			wantCode:  rules.Deny,
			wantRule:  "probe",
			wantReply: "554 5.7.1 Go away",
			wantCalls: []string{"probe connect", "probe deny-observer connect probe DENY"},
			wantLogs:  1,
		},
		{
			name:      "a code override of the other class is not applied",
			plugins:   "probe answer DENYSOFT code 554 enhanced 4.2.0",
			wantCode:  rules.DenySoft,
			wantRule:  "probe",
			wantReply: "450 4.2.0 Temporary failure, please try again later",
			wantCalls: []string{"probe connect", "probe deny-observer connect probe DENYSOFT"},
			wantLogs:  2, // the decision, and a warning that code was not applied
		},
		{
			name:      "disconnect answers map to 421 and 521",
			plugins:   "probe answer DENYSOFT_DISCONNECT say bye",
			wantCode:  rules.DenySoftDisconnect,
			wantRule:  "probe",
			wantReply: "421 4.7.0 bye",
			wantCalls: []string{"probe connect", "probe deny-observer connect probe DENYSOFT_DISCONNECT"},
			wantLogs:  1,
		},
		{
			name:      "a rule on dry_run is logged, then the chain goes on",
			plugins:   "probe:0 answer DENY dry_run 1\nprobe:1 answer DENYSOFT",
			wantCode:  rules.DenySoft,
			wantRule:  "probe:1",
			wantReply: "450 4.7.1 Temporary failure, please try again later",
			wantCalls: []string{"probe:0 connect", "probe:1 connect", "probe:0 deny-observer connect probe:1 DENYSOFT", "probe:1 deny-observer connect probe:1 DENYSOFT"},
			wantLogs:  2,
		},
		{
			// Before, a trial stopped at the first would-be decision: the
			// rules behind it neither logged nor built their state.
			name:      "global dry run: every rule decides, the first is observed, none refuses",
			plugins:   "probe:0 answer DENY\nprobe:1 answer DENYSOFT",
			opts:      rulestest.Options{DryRun: true},
			wantCode:  rules.Deny,
			wantRule:  "probe:0",
			wantReply: "550 5.7.1 Access denied",
			wantDry:   true,
			wantCalls: []string{"probe:0 connect", "probe:0 deny-observer connect probe:0 DENY", "probe:1 deny-observer connect probe:0 DENY",
				"probe:1 connect"},
			wantLogs: 2,
		},
		{
			name:      "disconnect runs every rule and ignores answers and errors",
			plugins:   "probe:0 answer DENY\nprobe:1 fail 1\nprobe:2",
			hook:      rules.HookDisconnect,
			wantCalls: []string{"probe:0 disconnect", "probe:1 disconnect", "probe:2 disconnect"},
			wantLogs:  1,
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := rulestest.NewWith(t, tc.plugins, nil, tc.opts)
			takeCalls()
			d := h.Run(tc.hook, h.Session("192.0.2.1"))
			if d.Code != tc.wantCode || d.Rule != tc.wantRule || d.Reply.String() != tc.wantReply || d.DryRun != tc.wantDry {
				t.Errorf("decision = %v by %q reply %q dry=%v; want %v by %q reply %q dry=%v",
					d.Code, d.Rule, d.Reply, d.DryRun, tc.wantCode, tc.wantRule, tc.wantReply, tc.wantDry)
			}
			if got := takeCalls(); strings.Join(got, "\n") != strings.Join(tc.wantCalls, "\n") {
				t.Errorf("calls:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.wantCalls, "\n"))
			}
			if n := strings.Count(h.Logs.String(), "\n"); n != tc.wantLogs {
				t.Errorf("%d log lines, want %d:\n%s", n, tc.wantLogs, h.Logs)
			}
			if d.Refuses() != (tc.wantCode.IsDeny() && !tc.wantDry) {
				t.Errorf("Refuses() = %v", d.Refuses())
			}
		})
	}
}

// A rule in dry run may not slow the MTA down: its delay is logged, as
// what would have happened, and not given; other rules' delays are.
func TestDryRunDelays(t *testing.T) {
	for _, tc := range []struct {
		name, plugins string
		opts          rulestest.Options
		wantDelay     time.Duration
		wantLog       string
	}{
		{"a tarpit on dry run", "probe:0 delay 3s dry_run 1\nprobe:1 delay 2s", rulestest.Options{}, 2 * time.Second, "delay not applied (dry run)"},
		{"a refusal on dry run", "probe:0 delay 1s\nprobe:1 answer DENYSOFT delay 5s dry_run 1", rulestest.Options{}, time.Second, "delay=6s dry_run=true"},
		{"global dry run", "probe:0 delay 1s\nprobe:1 answer DENYSOFT delay 5s", rulestest.Options{DryRun: true}, 0, "delay=6s dry_run=true"},
		{"no dry run", "probe:0 delay 1s\nprobe:1 answer DENYSOFT delay 5s", rulestest.Options{}, 6 * time.Second, "delay=6s dry_run=false"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := rulestest.NewWith(t, tc.plugins, nil, tc.opts)
			d := h.Run(rules.HookConnect, h.Session("192.0.2.1"))
			if d.Delay != tc.wantDelay {
				t.Errorf("delay given = %v, want %v", d.Delay, tc.wantDelay)
			}
			if !strings.Contains(h.Logs.String(), tc.wantLog) {
				t.Errorf("log lacks %q:\n%s", tc.wantLog, h.Logs)
			}
		})
	}
}

func TestPanicsAreCounted(t *testing.T) {
	h := rulestest.New(t, "probe panic 1", nil)
	for range 3 {
		h.Run(rules.HookConnect, h.Session("192.0.2.1"))
	}
	takeCalls()
	if h.Chain.Panics() != 3 || h.Chain.Errors() != 3 {
		t.Fatalf("panics=%d errors=%d, want 3 and 3", h.Chain.Panics(), h.Chain.Errors())
	}
}

func TestDecisionLogLine(t *testing.T) {
	h := rulestest.New(t, `probe answer DENYSOFT say "slow down"`, nil)
	s := h.Session("192.0.2.7")
	s.Session.Helo = "mx.example"
	s.Begin("1").QueueID = "ABC123"
	s.Txn.Sender = "a@example.org"
	s.Txn.Rcpt = "b@example.test"
	s.ClientName = "mx.example.org"
	h.Run(rules.HookRcpt, s)
	takeCalls()
	line := h.Logs.String()
	for _, want := range []string{"msg=decision", "queue_id=ABC123", "client=192.0.2.7", "client_name=mx.example.org", "helo=mx.example", "sender=a@example.org", "recipient=b@example.test", "hook=rcpt", "rule=probe", "answer=DENYSOFT", `text="slow down"`, "delay=0s", "dry_run=false"} {
		if !strings.Contains(line, want) {
			t.Errorf("log line lacks %s:\n%s", want, line)
		}
	}
}

func TestParseStoreErrorPolicy(t *testing.T) {
	for in, want := range map[string]rules.StoreErrorPolicy{"continue": rules.FailOpen, "tempfail": rules.FailTempfail, "": rules.FailOpen} {
		if got, err := rules.ParseStoreErrorPolicy(in); err != nil || got != want {
			t.Errorf("%q: %v %v", in, got, err)
		}
	}
	if _, err := rules.ParseStoreErrorPolicy("maybe"); err == nil {
		t.Error("maybe accepted")
	}
	_ = errors.New
}

// Files no rule reads are reported, so settings never go ignored in
// silence.
func TestUnreadFilesWarn(t *testing.T) {
	fsys := fstest.MapFS{
		"plugins":     {Data: []byte("probe:0\nprobe:1\n")},
		"probe":       {Data: []byte("say hello\n")},
		"probe:1":     {Data: []byte("say other\n")},
		"prbe":        {Data: []byte("say typo\n")},
		"probe~":      {Data: []byte("editor backup\n")},
		".probe.swp":  {Data: []byte("editor swap\n")},
		"probe.bak":   {Data: []byte("backup\n")},
		"sub/nothing": {Data: []byte("a directory\n")},
	}
	_, warns, err := rules.Load(fsys, "cfg", rules.Options{})
	if err != nil {
		t.Fatal(err)
	}
	got := warns.Error()
	for _, want := range []string{
		"cfg/prbe: warning: not read: no rule of that name in plugins",
		"cfg/probe:1: warning: not read: every instance of probe reads the file probe; give an instance its own settings on its plugins line",
	} {
		if !strings.Contains(got, want) {
			t.Errorf("warnings lack %q:\n%s", want, got)
		}
	}
	if len(warns) != 2 {
		t.Errorf("%d warnings, want 2:\n%s", len(warns), got)
	}
}

// An override of the other class is not applied, and said so once.
func TestOverrideOfTheOtherClassWarnsOnce(t *testing.T) {
	h := rulestest.New(t, "probe answer DENYSOFT code 550 enhanced 5.7.28", nil)
	for range 3 {
		if d := h.Run(rules.HookConnect, h.Session("192.0.2.1")); d.Reply.String() != "450 4.7.1 Temporary failure, please try again later" {
			t.Fatalf("reply %q", d.Reply)
		}
	}
	if n := strings.Count(h.Logs.String(), "override not applied"); n != 1 {
		t.Fatalf("%d warnings, want 1:\n%s", n, h.Logs)
	}
}
