package ratelimit_test

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/policyd-mail/policyd/rules"
	_ "github.com/policyd-mail/policyd/rules/ratelimit"
	"github.com/policyd-mail/policyd/rules/rulestest"
	_ "github.com/policyd-mail/policyd/rules/whitelist"
	"github.com/policyd-mail/policyd/store/memory"
)

// msg is one message in a session of its own, after the clock moved on
// by after; want is the answer of each recipient in turn, then of
// data_post ("" when the message never gets there).
type msg struct {
	after  time.Duration
	ip     string // default 192.0.2.1
	user   string // SASL login
	from   string // default sender@example.org
	rcpts  []string
	size   int64 // the SIZE= hint at RCPT, and the size at data_post
	want   string
	reason string // a refusal's text, when want has one
}

const (
	Y = "ok"
	N = "DENYSOFT"
)

// send plays m and returns the answers, "ok" or the code, joined by
// spaces; the last refusal's text is returned too.
func send(t *testing.T, h *rulestest.Harness, m msg) (string, string) {
	t.Helper()
	ctx := context.Background()
	s := h.Session(or(m.ip, "192.0.2.1"))
	defer s.End(ctx)
	s.AuthUser = m.user
	s.Connect(ctx)
	s.Helo(ctx, "Client.Example")
	s.Mail(ctx, rules.MailFrom{Sender: or(m.from, "sender@example.org"), ID: "1"})
	s.Txn.Size = m.size
	var got []string
	var text string
	accepted := 0
	for _, r := range m.rcpts {
		d := s.Rcpt(ctx, r)
		if d.Refuses() {
			got = append(got, d.Code.String())
			text = d.Text
			continue
		}
		accepted++
		got = append(got, Y)
	}
	if accepted > 0 {
		if d := s.DataPost(ctx); d.Refuses() {
			got = append(got, d.Code.String())
			text = d.Text
		} else {
			got = append(got, Y)
		}
	}
	return strings.Join(got, " "), text
}

func or(v, def string) string {
	if v == "" {
		return def
	}
	return v
}

func rcpts(n int, domain string) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = fmt.Sprintf("user%d@%s", i, domain)
	}
	return out
}

func TestRatelimit(t *testing.T) {
	one := []string{"bob@example.net"}
	tests := []struct {
		name    string
		plugins string
		file    string
		msgs    []msg
	}{
		{
			name:    "messages per SASL login; another login and an unauthenticated session are not limited by it",
			plugins: "ratelimit key sasl_username messages 3/1h",
			msgs: []msg{
				{user: "alice@example.org", rcpts: one, want: "ok ok"},
				{user: "alice@example.org", rcpts: one, want: "ok ok"},
				{user: "alice@example.org", rcpts: rcpts(3, "example.net"), want: "ok ok ok ok"}, // one message
				{user: "alice@example.org", rcpts: one, want: N, reason: "Rate limit exceeded for alice@example.org: 4 messages in 1h (limit 3)"},
				{user: "bob@example.org", rcpts: one, want: "ok ok"},
				{rcpts: one, want: "ok ok"},
				{rcpts: one, want: "ok ok"},
				{rcpts: one, want: "ok ok"},
				{rcpts: one, want: "ok ok"},
			},
		},
		{
			name:    "logins compare case-insensitively",
			plugins: "ratelimit key sasl_username messages 1/1h",
			msgs: []msg{
				{user: "Alice@Example.ORG", rcpts: one, want: "ok ok"},
				{user: "alice@example.org", rcpts: one, want: N, reason: "Rate limit exceeded for alice@example.org: 2 messages in 1h (limit 1)"},
			},
		},
		{
			name:    "recipients: the 5th recipient of a message is refused, the message still goes to the first four",
			plugins: "ratelimit key sasl_username recipients 4/1h",
			msgs: []msg{
				{user: "alice", rcpts: rcpts(5, "example.net"), want: "ok ok ok ok DENYSOFT ok", reason: "Rate limit exceeded for alice: 5 recipients in 1h (limit 4)"},
				// a refused recipient did not count: 15 minutes refill one
				{after: 15 * time.Minute, user: "alice", rcpts: rcpts(2, "example.net"), want: "ok DENYSOFT ok"},
			},
		},
		{
			name:    "a refusal does not count: the sender is let through as soon as the budget refills",
			plugins: "ratelimit key sender messages 3/1h",
			msgs: []msg{
				{rcpts: one, want: "ok ok"}, {rcpts: one, want: "ok ok"}, {rcpts: one, want: "ok ok"},
				{after: time.Minute, rcpts: one, want: N}, {rcpts: one, want: N}, {after: 10 * time.Minute, rcpts: one, want: N},
				{after: 9*time.Minute - time.Second, rcpts: one, want: N},
				{after: time.Second, rcpts: one, want: "ok ok"}, // 20 minutes after the first: one refilled
				{rcpts: one, want: N},
			},
		},
		{
			name:    "the null sender is not limited by a sender key",
			plugins: "ratelimit key sender messages 1/1h",
			msgs: []msg{
				{from: "<>", rcpts: one, want: "ok ok"}, {from: "<>", rcpts: one, want: "ok ok"},
				{from: "<A@B.example>", rcpts: one, want: "ok ok"}, {from: "a@b.example", rcpts: one, want: N, reason: "Rate limit exceeded for a@b.example: 2 messages in 1h (limit 1)"},
			},
		},
		{
			name:    "sender_domain",
			plugins: "ratelimit key sender_domain messages 2/1d",
			msgs: []msg{
				{from: "a@shop.example", rcpts: one, want: "ok ok"}, {from: "b@Shop.Example", rcpts: one, want: "ok ok"},
				{from: "c@shop.example", rcpts: one, want: N, reason: "Rate limit exceeded for shop.example: 3 messages in 1d (limit 2)"},
				{from: "c@other.example", rcpts: one, want: "ok ok"},
			},
		},
		{
			name:    "a compound key with a recipient part: a message counts once under each value its recipients give",
			plugins: "ratelimit key sasl_username,recipient_domain messages 2/1h",
			msgs: []msg{
				{user: "alice", rcpts: []string{"a@one.example", "b@two.example", "c@one.example"}, want: "ok ok ok ok"},
				{user: "alice", rcpts: []string{"d@one.example"}, want: "ok ok"},
				{user: "alice", rcpts: []string{"e@two.example", "f@one.example"}, want: "ok DENYSOFT ok", reason: "Rate limit exceeded for alice,one.example: 3 messages in 1h (limit 2)"},
			},
		},
		{
			name:    "client and client_network keys",
			plugins: "ratelimit:0 key client messages 2/1h\nratelimit:1 key client_network messages 3/1h",
			msgs: []msg{
				{ip: "192.0.2.1", rcpts: one, want: "ok ok"}, {ip: "192.0.2.1", rcpts: one, want: "ok ok"},
				{ip: "192.0.2.1", rcpts: one, want: N, reason: "Rate limit exceeded for 192.0.2.1: 3 messages in 1h (limit 2)"},
				{ip: "192.0.2.2", rcpts: one, want: "ok ok"},
				{ip: "192.0.2.3", rcpts: one, want: N, reason: "Rate limit exceeded for 192.0.2.0/24: 4 messages in 1h (limit 3)"},
			},
		},
		{
			name:    "helo",
			plugins: "ratelimit key helo messages 1/1h",
			msgs:    []msg{{rcpts: one, want: "ok ok"}, {rcpts: one, want: N, reason: "Rate limit exceeded for client.example: 2 messages in 1h (limit 1)"}},
		},
		{
			name:    "bytes: the SIZE= hint at RCPT, the rest at data_post",
			plugins: "ratelimit key sasl_username bytes 10K/1h",
			msgs: []msg{
				{user: "alice", size: 6000, rcpts: one, want: "ok ok"},
				{user: "alice", size: 6000, rcpts: one, want: N, reason: "Rate limit exceeded for alice: 12000 bytes in 1h (limit 10240)"},
				{user: "alice", size: 4000, rcpts: one, want: "ok ok"},
			},
		},
		{
			name:    "budgets combine: the first spent one answers",
			plugins: "ratelimit key sasl_username messages 10/1h recipients 3/1h",
			msgs: []msg{
				{user: "alice", rcpts: rcpts(2, "example.net"), want: "ok ok ok"},
				{user: "alice", rcpts: rcpts(2, "example.net"), want: "ok DENYSOFT ok", reason: "Rate limit exceeded for alice: 4 recipients in 1h (limit 3)"},
			},
		},
		{
			name:    "overrides: an exact value wins over its domain; unlimited; the others keep the instance's budgets",
			plugins: "ratelimit key sender messages 1/1h",
			file:    "limit newsletter@partner.example messages 3/1h\nlimit @partner.example unlimited\nlimit Big@Example.org messages 2/1h\n",
			msgs: []msg{
				{from: "x@partner.example", rcpts: one, want: "ok ok"}, {from: "x@partner.example", rcpts: one, want: "ok ok"},
				{from: "newsletter@partner.example", rcpts: one, want: "ok ok"}, {from: "newsletter@partner.example", rcpts: one, want: "ok ok"},
				{from: "newsletter@partner.example", rcpts: one, want: "ok ok"},
				{from: "newsletter@partner.example", rcpts: one, want: N, reason: "Rate limit exceeded for newsletter@partner.example: 4 messages in 1h (limit 3)"},
				{from: "big@example.org", rcpts: one, want: "ok ok"}, {from: "big@example.org", rcpts: one, want: "ok ok"},
				{from: "big@example.org", rcpts: one, want: N},
				{from: "small@example.org", rcpts: one, want: "ok ok"}, {from: "small@example.org", rcpts: one, want: N},
			},
		},
		{
			name:    "whitelisted sessions are skipped unless skip_whitelisted 0",
			plugins: "whitelist clients 192.0.2.0/24\nratelimit:0 key helo messages 1/1h\nratelimit:1 key sender messages 1/1h skip_whitelisted 0",
			msgs:    []msg{{rcpts: one, want: "ok ok"}, {rcpts: one, want: N, reason: "Rate limit exceeded for sender@example.org: 2 messages in 1h (limit 1)"}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			files := map[string]string{}
			if tc.file != "" {
				files["ratelimit"] = tc.file
			}
			h := rulestest.New(t, tc.plugins, files)
			for i, m := range tc.msgs {
				h.Clock.Advance(m.after)
				got, text := send(t, h, m)
				want := m.want
				if want == N {
					want = N // refused at its only recipient: no data_post
				}
				if got != want {
					t.Fatalf("message %d: %q, want %q (%s)", i+1, got, want, text)
				}
				if m.reason != "" && text != m.reason {
					t.Fatalf("message %d: text %q, want %q", i+1, text, m.reason)
				}
			}
		})
	}
}

// The worst-placed window: with messages 10/1h, a sender trying every
// minute gets 10 at once, then one every 6 minutes: at most 19 in any
// hour, and 10 + t/6min over a longer t. A fixed window would have let
// 20 through within two minutes around its boundary, then 10 more an
// hour later.
func TestWorstCaseBurst(t *testing.T) {
	h := rulestest.New(t, "ratelimit key sender messages 10/1h", nil)
	var passed []time.Duration
	at := time.Duration(0)
	for ; at < 3*time.Hour; at += time.Minute {
		for range 5 {
			if got, _ := send(t, h, msg{rcpts: []string{"r@example.net"}}); got == "ok ok" {
				passed = append(passed, at)
			}
		}
		h.Clock.Advance(time.Minute)
	}
	most := 0
	for i, start := range passed {
		j := i
		for j < len(passed) && passed[j] < start+time.Hour {
			j++
		}
		most = max(most, j-i)
	}
	if most != 19 || len(passed) != 10+29 {
		t.Fatalf("worst hour %d (want 19), %d in three hours (want 39)", most, len(passed))
	}
}

// One store call per recipient, and one at data_post only for bytes
// beyond the SIZE= hint; no call for a session the key does not apply to.
func TestStoreCalls(t *testing.T) {
	for _, tc := range []struct {
		plugins    string
		user       string
		hint, size int64
		rcpt, post int64
	}{
		{"ratelimit key sasl_username messages 100/1h recipients 500/1h bytes 50M/1d", "alice", 1000, 1000, 1, 0},
		{"ratelimit key sasl_username messages 100/1h recipients 500/1h bytes 50M/1d", "alice", 0, 1000, 1, 1},
		{"ratelimit key sasl_username messages 100/1h", "alice", 0, 1000, 1, 0},
		{"ratelimit key sasl_username messages 100/1h", "", 0, 1000, 0, 0},
	} {
		clock := rulestest.NewClock()
		st := rulestest.NewCountingStore(memory.New(memory.Options{Now: clock.Now, SweepInterval: -1}))
		c, _, err := rules.Load(fstest.MapFS{"plugins": {Data: []byte(tc.plugins)}}, "config", rules.Options{Store: st, Clock: clock})
		if err != nil {
			t.Fatal(err)
		}
		ctx := context.Background()
		s := rules.NewConversation(c, "test", netip.MustParseAddr("192.0.2.1"), 1, clock.Now())
		s.AuthUser = tc.user
		s.Connect(ctx)
		s.Mail(ctx, rules.MailFrom{Sender: "a@example.org"})
		s.Txn.Size = tc.hint
		before := st.Total()
		s.Rcpt(ctx, "b@example.net")
		rcpt := st.Total() - before
		s.Txn.Size = tc.size
		before = st.Total()
		s.DataPost(ctx)
		post := st.Total() - before
		if rcpt != tc.rcpt || post != tc.post {
			t.Errorf("%s (user %q, hint %d): %d calls at rcpt, %d at data_post; want %d, %d", tc.plugins, tc.user, tc.hint, rcpt, post, tc.rcpt, tc.post)
		}
		st.Close()
	}
}

func TestConfigErrors(t *testing.T) {
	tests := []struct{ plugins, file, want string }{
		{"ratelimit messages 3/1h", "", "config/plugins:1: ratelimit: key: missing: what to limit by (sasl_username, sender, sender_domain, recipient, recipient_domain, client, client_network, helo, or a comma list of them)"},
		{"ratelimit key user messages 3/1h", "", `config/plugins:1: ratelimit: key: "user" is not one of sasl_username, sender, sender_domain, recipient, recipient_domain, client, client_network, helo`},
		{"ratelimit key sender", "", "config/plugins:1: ratelimit: no budget: give messages, recipients or bytes (like messages 100/1h)"},
		{"ratelimit key sender messages 3", "", `config/plugins:1: ratelimit: messages: "3" is not N/DURATION (like 100/1h) or unlimited`},
		{"ratelimit key sender bytes 5X/1h", "", `config/plugins:1: ratelimit: bytes 5X/1h: "5X" is not a size (bytes, or with K, M or G, like 50M)`},
		{"ratelimit key sender messages 3/1y", "", `config/plugins:1: ratelimit: messages 3/1y: window "1y" is not a duration from 1s to 366d (like 90s, 1h, 1d, 1w)`},
		{"ratelimit key sender messages 3/1h", "# overrides\nlimit a@example.org mails 5/1h\n", `config/ratelimit:2: ratelimit: limit: unknown budget "mails": messages, recipients or bytes`},
		{"ratelimit key sender messages 3/1h", "limit a@example.org bytes 5Q/1h\n", `config/ratelimit:1: ratelimit: limit: bytes 5Q/1h: "5Q" is not a size (bytes, or with K, M or G, like 50M)`},
		{"ratelimit key sender,recipient_domain messages 3/1h", "limit a@example.org unlimited\n", `config/ratelimit:1: ratelimit: limit: "a@example.org" has 1 parts; the key has 2 (comma-joined, in the key's order)`},
	}
	for _, tc := range tests {
		fsys := fstest.MapFS{"plugins": {Data: []byte(tc.plugins)}}
		if tc.file != "" {
			fsys["ratelimit"] = &fstest.MapFile{Data: []byte(tc.file)}
		}
		_, _, err := rules.Load(fsys, "config", rules.Options{})
		if err == nil || err.Error() != tc.want {
			t.Errorf("%s | %q:\n got %v\nwant %s", tc.plugins, tc.file, err, tc.want)
		}
	}
}
