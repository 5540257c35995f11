package greylisting_test

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/rules/greylisting"
	"github.com/policyd-mail/policyd/rules/rulestest"
	_ "github.com/policyd-mail/policyd/rules/whitelist"
	"github.com/policyd-mail/policyd/store"
	"github.com/policyd-mail/policyd/store/memory"
)

// try is one delivery attempt of one recipient, after a pause.
type try struct {
	after time.Duration
	ip    string // default client
	from  string // default sender
	rcpt  string // default rcpt
	auth  string
	name  string // the client's verified name
	want  rules.Code
}

const (
	client = "192.0.2.10"
	sender = "sender@example.org"
	rcpt   = "user@example.test"
)

func defer_(after time.Duration) try { return try{after: after, want: rules.DenySoft} }
func pass(after time.Duration) try   { return try{after: after, want: rules.Declined} }

const short = "greylisting black_timeout 60 grey_timeout 300 white_timeout 1000"

func TestGreylisting(t *testing.T) {
	tests := []struct {
		name    string
		plugins string
		tries   []try
	}{
		{
			name:    "qpsmtpd's defaults: defer, retry after 50 minutes passes, then 36 days white",
			plugins: "greylisting",
			tries: []try{
				defer_(0), defer_(49 * time.Minute), defer_(time.Minute - time.Millisecond), pass(time.Millisecond),
				pass(35 * 24 * time.Hour), pass(35 * 24 * time.Hour),
			},
		},
		{
			name:    "an unconfirmed triplet is forgotten after grey_timeout (3h20m) from first seen",
			plugins: "greylisting",
			tries:   []try{defer_(0), defer_(3*time.Hour + 20*time.Minute), defer_(49 * time.Minute), pass(time.Minute)},
		},
		{
			name:    "a retry just inside grey_timeout confirms",
			plugins: "greylisting",
			tries:   []try{defer_(0), pass(3*time.Hour + 20*time.Minute - time.Millisecond)},
		},
		{
			name:    "the white entry lives white_timeout after its last write",
			plugins: short, // refresh every 100s
			tries: []try{
				defer_(0), pass(60 * time.Second), // white since 60s
				pass(50 * time.Second),  // younger than the refresh (100s): not written
				pass(949 * time.Second), // 999s after 60s: written again, white since 1059s
				pass(999 * time.Second), // written again, white since 2058s
				defer_(1000 * time.Second),
			},
		},
		{
			name:    "without a pass for white_timeout the triplet starts over",
			plugins: short,
			tries:   []try{defer_(0), pass(60 * time.Second), pass(50 * time.Second), defer_(950 * time.Second)},
		},
		{
			name:    "the client network is the /24",
			plugins: short,
			tries: []try{
				defer_(0), {after: 60 * time.Second, ip: "192.0.2.200", want: rules.Declined},
				{ip: "192.0.3.10", want: rules.DenySoft},
			},
		},
		{
			name:    "ipv4_prefix 32 greylists each address",
			plugins: short + " ipv4_prefix 32",
			tries:   []try{defer_(0), {after: 60 * time.Second, ip: "192.0.2.11", want: rules.DenySoft}, pass(0)},
		},
		{
			name:    "IPv6 clients by /64",
			plugins: short,
			tries: []try{
				{ip: "2001:db8:1:2::1", want: rules.DenySoft},
				{after: 60 * time.Second, ip: "2001:db8:1:2:ffff::9", want: rules.Declined},
				{ip: "2001:db8:1:3::1", want: rules.DenySoft},
			},
		},
		{
			name:    "sender and recipient are part of the triplet, case-insensitively",
			plugins: short,
			tries: []try{
				defer_(0),
				{after: 60 * time.Second, from: "other@example.org", want: rules.DenySoft},
				{rcpt: "other@example.test", want: rules.DenySoft},
				{from: "<Sender@EXAMPLE.org>", rcpt: "<USER@example.test>", want: rules.Declined},
			},
		},
		{
			name:    "the null sender is greylisted like any other",
			plugins: short,
			tries:   []try{{from: "<>", want: rules.DenySoft}, {after: 60 * time.Second, from: "<>", want: rules.Declined}, {from: "x@example.org", want: rules.DenySoft}},
		},
		{
			name:    "sender 0: any sender from a confirmed network to that recipient",
			plugins: short + " sender 0",
			tries:   []try{defer_(0), {after: 60 * time.Second, from: "other@example.org", want: rules.Declined}, {rcpt: "x@example.test", want: rules.DenySoft}},
		},
		{
			name:    "recipient 0 and remote_ip 0: by sender alone",
			plugins: short + " recipient 0 remote_ip 0",
			tries:   []try{defer_(0), {after: 60 * time.Second, ip: "198.51.100.1", rcpt: "x@example.test", want: rules.Declined}, {from: "y@example.org", want: rules.DenySoft}},
		},
		{
			name:    "whitelisted clients pass",
			plugins: "whitelist clients 192.0.2.0/24\n" + short,
			tries:   []try{pass(0), {ip: "198.51.100.1", want: rules.DenySoft}},
		},
		{
			name:    "authenticated clients pass",
			plugins: short,
			tries:   []try{{auth: "alice", want: rules.Declined}, {want: rules.DenySoft}},
		},
		{
			name:    "mode testonly records but never defers",
			plugins: short + " mode testonly",
			tries:   []try{pass(0), pass(time.Second)},
		},
		{
			name:    "mode off",
			plugins: short + " mode off",
			tries:   []try{pass(0)},
		},
		{
			name:    "postmaster@ and abuse@ of any domain are never greylisted; other recipients are",
			plugins: short,
			tries: []try{
				{rcpt: "postmaster@example.test", want: rules.Declined}, {rcpt: "<Abuse@Other.example>", want: rules.Declined},
				{rcpt: "postmaster", want: rules.Declined}, {rcpt: "postmaster.x@example.test", want: rules.DenySoft},
			},
		},
		{
			name:    "whitelist_recipient adds local@, @domain and exact addresses",
			plugins: short + " whitelist_recipient hostmaster@,@open.example whitelist_recipient Info@Shop.example",
			tries: []try{
				{rcpt: "hostmaster@x.example", want: rules.Declined}, {rcpt: "anyone@open.example", want: rules.Declined},
				{rcpt: "info@shop.example", want: rules.Declined}, {rcpt: "sales@shop.example", want: rules.DenySoft},
				{rcpt: "postmaster@x.example", want: rules.Declined},
			},
		},
		{
			name:    "whitelist_recipient none drops postmaster@ and abuse@",
			plugins: short + " whitelist_recipient none,none,a@ whitelist_recipient none",
			tries:   []try{{rcpt: "postmaster@example.test", want: rules.DenySoft}},
		},
		{
			name:    "whitelist_client_name matches the verified name by domain suffix",
			plugins: short + " whitelist_client_name google.com,.outlook.com",
			tries: []try{
				{name: "mail-sor-f41.google.com", want: rules.Declined}, {name: "GOOGLE.COM.", want: rules.Declined},
				{name: "eur.outlook.com", want: rules.Declined},
				{name: "notgoogle.com", want: rules.DenySoft}, {name: "google.com.evil.example", rcpt: "x@example.test", want: rules.DenySoft},
				{name: "unknown", rcpt: "y@example.test", want: rules.DenySoft},
			},
		},
		{
			name:    "auto_whitelist: after N confirmed triplets the network's new triplets pass",
			plugins: short + " auto_whitelist 2",
			tries: []try{
				{rcpt: "a@example.test", want: rules.DenySoft}, {rcpt: "b@example.test", want: rules.DenySoft},
				{rcpt: "c@example.test", want: rules.DenySoft},
				{after: 60 * time.Second, rcpt: "a@example.test", want: rules.Declined}, // 1 confirmed
				{rcpt: "d@example.test", want: rules.DenySoft},
				{rcpt: "b@example.test", want: rules.Declined}, // 2 confirmed
				{rcpt: "e@example.test", want: rules.Declined}, // new, passes at once
				{ip: "192.0.2.99", rcpt: "f@example.test", want: rules.Declined},
				{ip: "192.0.3.1", rcpt: "f@example.test", want: rules.DenySoft}, // another /24
				// the tally lives white_timeout after its last confirmation
				{after: 1000 * time.Second, rcpt: "g@example.test", want: rules.DenySoft},
			},
		},
		{
			name:    "auto_whitelist 0 turns it off",
			plugins: short + " auto_whitelist 0",
			tries: []try{
				{rcpt: "a@example.test", want: rules.DenySoft}, {rcpt: "b@example.test", want: rules.DenySoft},
				{after: 60 * time.Second, rcpt: "a@example.test", want: rules.Declined},
				{rcpt: "b@example.test", want: rules.Declined}, {rcpt: "c@example.test", want: rules.DenySoft},
			},
		},
		{
			name:    "two instances keep their own entries",
			plugins: "greylisting:0 black_timeout 60\ngreylisting:1 black_timeout 120",
			// The second instance first sees the triplet when the first
			// lets it through (qpsmtpd's order: the first answer wins).
			tries: []try{defer_(0), defer_(60 * time.Second), defer_(60 * time.Second), pass(60 * time.Second)},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := rulestest.New(t, tc.plugins, nil)
			ctx := context.Background()
			for i, tr := range tc.tries {
				h.Clock.Advance(tr.after)
				ip, from, to := or(tr.ip, client), or(tr.from, sender), or(tr.rcpt, rcpt)
				s := h.Session(ip)
				s.AuthUser = tr.auth
				s.ClientName = tr.name
				s.Connect(ctx)
				s.Mail(ctx, rules.MailFrom{Sender: from})
				d := s.Rcpt(ctx, to)
				if d.Code != tr.want {
					t.Fatalf("try %d (%s, %q → %q): %v %q, want %v", i+1, ip, from, to, d.Code, d.Text, tr.want)
				}
				if d.Code == rules.DenySoft && d.Reply.String() != "450 4.7.1 "+greylisting.Text {
					t.Fatalf("try %d: reply %q", i+1, d.Reply)
				}
				s.End(ctx)
			}
		})
	}
}

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

func or(v, def string) string {
	if v == "" {
		return def
	}
	return v
}

// The stored entry: its key (network tag, hashed sender and recipient),
// its value and its expiry at each stage.
func TestStoredEntry(t *testing.T) {
	h := rulestest.New(t, short, nil)
	ctx := context.Background()
	sum := sha256.Sum256([]byte("s:" + sender + "\x00r:" + rcpt + "\x00"))
	key := "policyd:{192.0.2.0/24}:greylisting:triplet:" + hex.EncodeToString(sum[:16])
	if got := store.HashTag(key); got != "192.0.2.0/24" {
		t.Fatalf("hash tag %q", got)
	}
	attempt := func() {
		s := h.Session(client)
		s.Connect(ctx)
		s.Mail(ctx, rules.MailFrom{Sender: sender})
		s.Rcpt(ctx, rcpt)
	}
	check := func(state string, ttl time.Duration) {
		t.Helper()
		e, ok, err := h.Store.Inspect(ctx, key)
		if err != nil || !ok {
			t.Fatalf("no entry %s: %v", key, err)
		}
		if want := state + strconv.FormatInt(h.Clock.Now().UnixMilli(), 10); string(e.Value) != want || e.TTL != ttl {
			t.Fatalf("entry %q ttl %v, want %q ttl %v", e.Value, e.TTL, want, ttl)
		}
	}
	attempt()
	check("g:", 300*time.Second)
	h.Clock.Advance(60 * time.Second)
	attempt()
	check("w:", 1000*time.Second)
	h.Clock.Advance(1000 * time.Second)
	if _, ok, _ := h.Store.Inspect(ctx, key); ok {
		t.Fatal("the white entry outlives white_timeout")
	}
}

// One store call per recipient, except on the transitions: confirmation,
// the periodic refresh of a white entry, and a restart.
func TestStoreCallsPerRecipient(t *testing.T) {
	clock := rulestest.NewClock()
	st := rulestest.NewCountingStore(memory.New(memory.Options{Now: clock.Now, SweepInterval: -1}))
	defer st.Close()
	c, _, err := rules.Load(fstest.MapFS{"plugins": {Data: []byte(short)}}, "config", rules.Options{Store: st, Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	steps := []struct {
		after time.Duration
		calls int64
		what  string
	}{
		// A new triplet also reads its network's auto-whitelist tally; a
		// confirmation adds to it.
		{0, 2, "new"}, {30 * time.Second, 1, "still grey"}, {30 * time.Second, 3, "confirmed"},
		{10 * time.Second, 1, "white"}, {89 * time.Second, 1, "white"}, {time.Second, 2, "white, refreshed"},
		{time.Second, 1, "white"},
	}
	for _, stp := range steps {
		clock.Advance(stp.after)
		s := rules.NewConversation(c, "test", addr("192.0.2.1"), 1, clock.Now())
		s.Connect(ctx)
		s.Mail(ctx, rules.MailFrom{Sender: sender})
		before := st.Total()
		s.Rcpt(ctx, rcpt)
		if got := st.Total() - before; got != stp.calls {
			t.Errorf("%s: %d store calls, want %d", stp.what, got, stp.calls)
		}
	}
}

func TestConfigErrors(t *testing.T) {
	tests := []struct{ plugins, want string }{
		{"greylisting black_timeout 3h grey_timeout 1h", "config/plugins:1: greylisting: black_timeout (3h0m0s) must be shorter than grey_timeout (1h0m0s): no retry could ever pass"},
		{"greylisting remote_ip 0 sender 0 recipient 0", "config/plugins:1: greylisting: remote_ip, sender and recipient are all off: there is nothing to greylist on"},
		{"greylisting mode reject", `config/plugins:1: greylisting: mode: "reject" is not denysoft, testonly or off`},
		{"greylisting ipv4_prefix 33", "config/plugins:1: greylisting: ipv4_prefix: 33 is out of range [8, 32]"},
		{"greylisting deny_late 1", `config/plugins:1: greylisting: unknown key "deny_late"`},
		{"greylisting whitelist_recipient postmaster", `config/plugins:1: greylisting: whitelist_recipient: "postmaster" is not local@, @domain or local@domain`},
		{"greylisting whitelist_client_name *.google.com", `config/plugins:1: greylisting: whitelist_client_name: "*.google.com" is not a domain name (a suffix such as google.com)`},
		{"greylisting auto_whitelist -1", "config/plugins:1: greylisting: auto_whitelist: -1 is out of range [0, 1000000]"},
	}
	for _, tc := range tests {
		_, _, err := rules.Load(fstest.MapFS{"plugins": {Data: []byte(tc.plugins)}}, "config", rules.Options{})
		if err == nil || err.Error() != tc.want {
			t.Errorf("%s:\n got %v\nwant %s", tc.plugins, err, tc.want)
		}
	}
	h := rulestest.New(t, "greylisting", map[string]string{"greylisting": "# qpsmtpd's arguments\nblack_timeout 1200\ndb_dir /var/lib/qpsmtpd/greylisting\n"})
	if want := "config/greylisting:3: warning: greylisting: db_dir is ignored: greylist entries live in policyd's store (--store)"; len(h.Warns) != 1 || h.Warns[0].Error() != want {
		t.Errorf("warnings %v\nwant %s", h.Warns, want)
	}
}

func TestTestOnlyLogs(t *testing.T) {
	h := rulestest.New(t, short+" mode testonly", nil)
	ctx := context.Background()
	s := h.Session(client)
	s.Connect(ctx)
	s.Mail(ctx, rules.MailFrom{Sender: sender})
	if d := s.Rcpt(ctx, rcpt); d.Code != rules.Declined {
		t.Fatalf("testonly answered %v", d.Code)
	}
	if !strings.Contains(h.Logs.String(), "greylisting would defer (mode testonly)") {
		t.Fatalf("no log line:\n%s", h.Logs)
	}
	keys, _ := h.Store.Scan(ctx, store.ClientPrefix("192.0.2.0/24"))
	if len(keys) != 1 {
		t.Fatalf("testonly keeps no entry: %v", keys)
	}
}

func BenchmarkRcptWhite(b *testing.B) {
	h := rulestest.New(b, short, nil)
	ctx := context.Background()
	s := h.Session(client)
	s.Connect(ctx)
	s.Mail(ctx, rules.MailFrom{Sender: sender})
	s.Rcpt(ctx, rcpt)
	h.Clock.Advance(time.Minute)
	b.ReportAllocs()
	for b.Loop() {
		s.Rcpt(ctx, rcpt)
		s.Txn.Rcpts = s.Txn.Rcpts[:0]
	}
}

// The null sender is deferred at DATA, not RCPT: a sender-verification
// probe (MAIL FROM:<>, RCPT TO, QUIT) gets its 250; a bounce is deferred
// at DATA until its triplets pass, then passes. Before, the probe itself
// was deferred at RCPT.
func TestNullSenderAtData(t *testing.T) {
	h := rulestest.New(t, short, nil)
	ctx := context.Background()
	bounce := func() (rcptCodes []rules.Code, data rules.Code) {
		s := h.Session(client)
		s.Connect(ctx)
		s.Mail(ctx, rules.MailFrom{Sender: ""})
		for _, r := range []string{rcpt, "other@example.test"} {
			rcptCodes = append(rcptCodes, s.Rcpt(ctx, r).Code)
		}
		data = s.Data(ctx).Code
		s.End(ctx)
		return rcptCodes, data
	}
	rc, data := bounce()
	if rc[0] != rules.Declined || rc[1] != rules.Declined || data != rules.DenySoft {
		t.Fatalf("first bounce: rcpt %v, data %v; want both recipients accepted, DATA deferred", rc, data)
	}
	h.Clock.Advance(2 * time.Minute) // past black_timeout
	if rc, data := bounce(); rc[0] != rules.Declined || data != rules.Declined {
		t.Fatalf("the retry: rcpt %v, data %v; want it through", rc, data)
	}
}
