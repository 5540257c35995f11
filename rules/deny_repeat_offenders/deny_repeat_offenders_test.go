package denyrepeatoffenders_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/policyd-mail/policyd/rules"
	_ "github.com/policyd-mail/policyd/rules/badmailfrom"
	_ "github.com/policyd-mail/policyd/rules/badrcptto"
	denyrepeatoffenders "github.com/policyd-mail/policyd/rules/deny_repeat_offenders"
	_ "github.com/policyd-mail/policyd/rules/greylisting"
	"github.com/policyd-mail/policyd/rules/rulestest"
	_ "github.com/policyd-mail/policyd/rules/whitelist"
	"github.com/policyd-mail/policyd/store"
)

// refuser answers every recipient with the code named by its "answer"
// setting, so the tests can feed the observer each kind of refusal.
type refuser struct{ code rules.Code }

func (r refuser) Rcpt(context.Context, *rules.Session) (rules.Result, error) {
	return rules.Decided(r.code, "refused by test_refuser"), nil
}

func init() {
	rules.Register(rules.Definition{Name: "test_refuser", Setup: func(b *rules.Binder, _ rules.Env) (any, error) {
		codes := map[string]rules.Code{"DENY": rules.Deny, "DENY_DISCONNECT": rules.DenyDisconnect,
			"DENYSOFT": rules.DenySoft, "DENYSOFT_DISCONNECT": rules.DenySoftDisconnect, "DECLINED": rules.Declined}
		c, ok := codes[b.String("answer", "DENY")]
		if !ok {
			b.Errorf("answer: unknown code")
		}
		return refuser{c}, nil
	}})
}

// step is one session: a refused message ("deny"), or a plain connect
// whose answer is checked.
type step struct {
	after time.Duration
	ip    string
	deny  bool
	want  rules.Code
}

func denied(ip string) step                   { return step{ip: ip, deny: true} }
func connect(ip string, want rules.Code) step { return step{ip: ip, want: want} }
func later(d time.Duration, ip string, want rules.Code) step {
	return step{after: d, ip: ip, want: want}
}

const client = "192.0.2.1"

func TestDenyRepeatOffenders(t *testing.T) {
	tests := []struct {
		name    string
		plugins string
		files   map[string]string
		steps   []step
	}{
		{
			name:    "threshold 3: the fourth session is tempfailed, another client is not",
			plugins: "deny_repeat_offenders threshold 3\nbadrcptto recipient @trap.example",
			steps: []step{
				denied(client), denied(client), connect(client, rules.Declined),
				denied(client), connect(client, rules.DenySoft), connect(client, rules.DenySoft),
				connect("192.0.2.2", rules.Declined), connect("192.0.2.0", rules.Declined),
			},
		},
		{
			name:    "the observer sees refusals of rules earlier in the chain",
			plugins: "badmailfrom sender @spam.example\ndeny_repeat_offenders threshold 2",
			steps:   []step{denied(client), connect(client, rules.Declined), denied(client), connect(client, rules.DenySoft)},
		},
		{
			name:    "and of rules later in the chain",
			plugins: "deny_repeat_offenders threshold 2\nbadmailfrom sender @spam.example",
			steps:   []step{denied(client), connect(client, rules.Declined), denied(client), connect(client, rules.DenySoft)},
		},
		{
			name:    "the count starts over after more than reset (8h) without a refusal",
			plugins: "deny_repeat_offenders threshold 2\nbadrcptto recipient @trap.example",
			steps: []step{
				denied(client),
				{after: 8*time.Hour + time.Millisecond, ip: client, deny: true},
				connect(client, rules.Declined),
			},
		},
		{
			name:    "exactly reset apart still counts",
			plugins: "deny_repeat_offenders threshold 2\nbadrcptto recipient @trap.example",
			steps:   []step{denied(client), {after: 8 * time.Hour, ip: client, deny: true}, connect(client, rules.DenySoft)},
		},
		{
			name:    "refused while the last refusal is less than window (12h) old",
			plugins: "deny_repeat_offenders threshold 2\nbadrcptto recipient @trap.example",
			steps: []step{
				denied(client), denied(client),
				later(12*time.Hour-time.Millisecond, client, rules.DenySoft),
				later(time.Millisecond, client, rules.Declined),
			},
		},
		{
			name:    "windows are configurable",
			plugins: "deny_repeat_offenders threshold 2 reset 60 window 90s\nbadrcptto recipient @trap.example",
			steps: []step{
				denied(client), {after: 61 * time.Second, ip: client, deny: true}, connect(client, rules.Declined),
				{after: 60 * time.Second, ip: client, deny: true}, connect(client, rules.DenySoft),
				later(89*time.Second, client, rules.DenySoft), later(time.Second, client, rules.Declined),
			},
		},
		{
			name:    "a reset longer than the window keeps counting past the window",
			plugins: "deny_repeat_offenders threshold 2 reset 2h window 1h\nbadrcptto recipient @trap.example",
			steps: []step{
				denied(client), {after: 90 * time.Minute, ip: client, deny: true}, connect(client, rules.DenySoft),
				later(time.Hour, client, rules.Declined),
			},
		},
		{
			name:    "DENYSOFT is not counted",
			plugins: "deny_repeat_offenders threshold 1\ntest_refuser answer DENYSOFT",
			steps:   []step{denied(client), denied(client), connect(client, rules.Declined)},
		},
		{
			name:    "DENYSOFT_DISCONNECT is not counted",
			plugins: "deny_repeat_offenders threshold 1\ntest_refuser answer DENYSOFT_DISCONNECT",
			steps:   []step{denied(client), connect(client, rules.Declined)},
		},
		{
			name:    "DENY_DISCONNECT is counted",
			plugins: "deny_repeat_offenders threshold 1\ntest_refuser answer DENY_DISCONNECT",
			steps:   []step{denied(client), connect(client, rules.DenySoft)},
		},
		{
			name:    "a rule in dry_run feeds nothing",
			plugins: "deny_repeat_offenders threshold 1\nbadrcptto recipient @trap.example dry_run 1",
			steps:   []step{denied(client), denied(client), connect(client, rules.Declined)},
		},
		{
			name:    "whitelisted clients are neither counted nor refused",
			plugins: "whitelist clients 192.0.2.0/24\ndeny_repeat_offenders threshold 1\nbadrcptto recipient @trap.example",
			steps:   []step{denied(client), connect(client, rules.Declined), denied("203.0.113.5"), connect("203.0.113.5", rules.DenySoft)},
		},
		{
			name:    "IPv6 clients are counted per /64",
			plugins: "deny_repeat_offenders threshold 2\nbadrcptto recipient @trap.example",
			steps: []step{
				denied("2001:db8:1:2::1"), denied("2001:db8:1:2::ffff"),
				connect("2001:db8:1:2:aaaa::1", rules.DenySoft), connect("2001:db8:1:3::1", rules.Declined),
			},
		},
		{
			name:    "the seed's positional form",
			plugins: "deny_repeat_offenders ip_deny_db.dbm 2\nbadrcptto recipient @trap.example",
			steps:   []step{denied(client), connect(client, rules.Declined), denied(client), connect(client, rules.DenySoft)},
		},
		{
			name:    "positional form followed by keys",
			plugins: "deny_repeat_offenders ip_deny_db.dbm 1 window 60\nbadrcptto recipient @trap.example",
			steps:   []step{denied(client), later(59*time.Second, client, rules.DenySoft), later(time.Second, client, rules.Declined)},
		},
		{
			name:    "default threshold is 5",
			plugins: "deny_repeat_offenders\nbadrcptto recipient @trap.example",
			steps: []step{
				denied(client), denied(client), denied(client), denied(client), connect(client, rules.Declined),
				denied(client), connect(client, rules.DenySoft),
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := rulestest.New(t, tc.plugins, tc.files)
			for i, st := range tc.steps {
				h.Clock.Advance(st.after)
				if st.deny {
					refuse(t, h, st.ip, i)
					continue
				}
				s, d := h.Connect(st.ip)
				if d.Code != st.want {
					t.Fatalf("step %d (%s): connect %v %q, want %v", i+1, st.ip, d.Code, d.Text, st.want)
				}
				if d.Code == rules.DenySoft && (d.Text != denyrepeatoffenders.Text || d.Reply.String() != "450 4.7.1 "+denyrepeatoffenders.Text) {
					t.Fatalf("step %d: reply %q", i+1, d.Reply)
				}
				s.End(context.Background())
			}
		})
	}
}

// refuse runs one session whose only message is refused at RCPT.
func refuse(t *testing.T, h *rulestest.Harness, ip string, i int) {
	t.Helper()
	ctx := context.Background()
	s := h.Session(ip)
	if d := s.Connect(ctx); d.Code != rules.Declined {
		t.Fatalf("step %d (%s): the refused session's connect answered %v", i+1, ip, d.Code)
	}
	s.Mail(ctx, rules.MailFrom{Sender: "someone@spam.example"})
	// A feeding rule in dry_run answers continue; the log shows it decided.
	if d := s.Rcpt(ctx, "victim@trap.example"); !d.Code.IsDeny() && !strings.Contains(h.Logs.String(), "dry_run=true") {
		t.Fatalf("step %d (%s): the feeding rule did not refuse: %v", i+1, ip, d.Code)
	}
	s.End(ctx)
}

// A message counts once however many of its recipients are refused (before,
// one message to three trap addresses made an offender at threshold 3);
// with count answer, every refusal counts, as every qpsmtpd DENY fired
// hook_deny.
func TestOneCountPerTransaction(t *testing.T) {
	h := rulestest.New(t, "deny_repeat_offenders threshold 3\nbadrcptto recipient @trap.example", nil)
	ctx := context.Background()
	s := h.Session(client)
	s.Connect(ctx)
	s.Mail(ctx, rules.MailFrom{Sender: "someone@example.org"})
	for _, r := range []string{"a@trap.example", "b@trap.example", "c@trap.example"} {
		s.Rcpt(ctx, r)
	}
	s.End(ctx)
	recs, err := h.Store.HGet(ctx, store.Key(client, "deny_repeat_offenders", "offender"))
	if err != nil || recs[0][store.TallyCount] != 1 {
		t.Fatalf("record %v, %v; want one count for one message", recs, err)
	}
	if _, d := h.Connect(client); d.Code != rules.Declined {
		t.Fatalf("next connect: %v", d.Code)
	}
}

func TestEveryRefusedRecipientCounts(t *testing.T) {
	h := rulestest.New(t, "deny_repeat_offenders threshold 3 count answer\nbadrcptto recipient @trap.example", nil)
	ctx := context.Background()
	s := h.Session(client)
	s.Connect(ctx)
	s.Mail(ctx, rules.MailFrom{Sender: "someone@example.org"})
	for _, r := range []string{"a@trap.example", "b@trap.example", "c@trap.example", "ok@example.test"} {
		s.Rcpt(ctx, r)
	}
	s.End(ctx)
	recs, err := h.Store.HGet(ctx, store.Key(client, "deny_repeat_offenders", "offender"))
	if err != nil || recs[0][store.TallyCount] != 3 || recs[0][store.TallyLast] != h.Clock.Now().UnixMilli() {
		t.Fatalf("record %v, %v", recs, err)
	}
	if _, d := h.Connect(client); d.Code != rules.DenySoft {
		t.Fatalf("next connect: %v", d.Code)
	}
}

// A stale record is gone from the store, not only ignored.
func TestStaleRecordExpires(t *testing.T) {
	h := rulestest.New(t, "deny_repeat_offenders threshold 1 reset 30m window 1h\nbadrcptto recipient @trap.example", nil)
	refuse(t, h, client, 0)
	key := store.Key(client, "deny_repeat_offenders", "offender")
	ctx := context.Background()
	if _, ok, _ := h.Store.Inspect(ctx, key); !ok {
		t.Fatal("no record after a refusal")
	}
	h.Clock.Advance(time.Hour)
	if _, ok, _ := h.Store.Inspect(ctx, key); ok {
		t.Fatal("the record outlives its window")
	}
}

// Two instances keep separate records.
func TestInstances(t *testing.T) {
	h := rulestest.New(t, "deny_repeat_offenders:0 threshold 1\ndeny_repeat_offenders:1 threshold 5\nbadrcptto recipient @trap.example", nil)
	refuse(t, h, client, 0)
	_, d := h.Connect(client)
	if d.Code != rules.DenySoft || d.Rule != "deny_repeat_offenders:0" {
		t.Fatalf("connect: %v by %q", d.Code, d.Rule)
	}
	for _, inst := range []string{"deny_repeat_offenders:0", "deny_repeat_offenders:1"} {
		if _, ok, _ := h.Store.Inspect(context.Background(), store.Key(client, inst, "offender")); !ok {
			t.Errorf("%s has no record", inst)
		}
	}
}

func TestSeedFileWarns(t *testing.T) {
	h := rulestest.New(t, "deny_repeat_offenders ip_deny_db.dbm 5", nil)
	want := "config/plugins:1: warning: deny_repeat_offenders: file is ignored: offender records live in policyd's store (--store)"
	if len(h.Warns) != 1 || h.Warns[0].Error() != want {
		t.Fatalf("warnings: %v\nwant %s", h.Warns, want)
	}
}

func TestConfigErrors(t *testing.T) {
	tests := []struct{ plugins, want string }{
		{"deny_repeat_offenders ip_deny_db.dbm many", `config/plugins:1: deny_repeat_offenders: threshold: "many" is not a whole number`},
		{"deny_repeat_offenders threshold 0", `config/plugins:1: deny_repeat_offenders: threshold: 0 is out of range [1, 2147483648]`},
		{"deny_repeat_offenders threshold", `config/plugins:1: deny_repeat_offenders: arguments are "key value" pairs; "threshold" has no value`},
		{"deny_repeat_offenders db 5 window", `config/plugins:1: deny_repeat_offenders: arguments are "key value" pairs; "window" has no value`},
		{"deny_repeat_offenders window forever", `config/plugins:1: deny_repeat_offenders: window: "forever" is not a duration (seconds, or like 90s, 15m, 12h)`},
		{"deny_repeat_offenders threshold 2 expire 1h", `config/plugins:1: deny_repeat_offenders: unknown key "expire"`},
	}
	for _, tc := range tests {
		_, _, err := rules.Load(fstest.MapFS{"plugins": {Data: []byte(tc.plugins)}}, "config", rules.Options{})
		if err == nil || err.Error() != tc.want {
			t.Errorf("%s:\n got %v\nwant %s", tc.plugins, err, tc.want)
		}
	}
	// The rule's own file, keyed.
	_, _, err := rules.Load(fstest.MapFS{
		"plugins":               {Data: []byte("deny_repeat_offenders\n")},
		"deny_repeat_offenders": {Data: []byte("threshold 3\nreset 8h\nthreshold 4\n")},
	}, "config", rules.Options{})
	if want := "config/deny_repeat_offenders:3: deny_repeat_offenders: threshold: set again (first at line 1)"; err == nil || err.Error() != want {
		t.Errorf("got %v\nwant %s", err, want)
	}
}

func BenchmarkConnect(b *testing.B) {
	h := rulestest.New(b, "deny_repeat_offenders threshold 3", nil)
	s := h.Session(client)
	b.ReportAllocs()
	for b.Loop() {
		h.Run(rules.HookConnect, s)
	}
}

func BenchmarkDenyObserver(b *testing.B) {
	h := rulestest.New(b, "deny_repeat_offenders threshold 1000000\nbadrcptto recipient @trap.example", nil)
	ctx := context.Background()
	s := h.Session(client)
	s.Connect(ctx)
	s.Mail(ctx, rules.MailFrom{Sender: "a@example.org"})
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		s.Rcpt(ctx, fmt.Sprintf("u%d@trap.example", i%8))
	}
}
