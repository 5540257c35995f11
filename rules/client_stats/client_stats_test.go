package clientstats_test

import (
	"context"
	"net/netip"
	"strconv"
	"testing"
	"testing/fstest"
	"time"

	"github.com/policyd-mail/policyd/rules"
	clientstats "github.com/policyd-mail/policyd/rules/client_stats"
	"github.com/policyd-mail/policyd/rules/rulestest"
	"github.com/policyd-mail/policyd/store"
	"github.com/policyd-mail/policyd/store/memory"
)

// session is one SMTP session: connect, MAIL, the recipients, then the
// message unless noData (the transaction is reset instead).
type session struct {
	ip     string
	rcpts  []string
	noData bool
}

// run plays one session through the conversation model, as a front-end
// would, and returns the session.
func run(h *rulestest.Harness, ss session) *rules.Conversation {
	h.T.Helper()
	ctx := context.Background()
	s := h.Session(ss.ip)
	defer s.End(ctx)
	if s.Connect(ctx).Refuses() {
		return s
	}
	s.Helo(ctx, "client.example")
	if s.Mail(ctx, rules.MailFrom{Sender: "sender@example.org"}).Refuses() {
		return s
	}
	rcpts := ss.rcpts
	if len(rcpts) == 0 {
		rcpts = []string{"user@example.test"}
	}
	accepted := 0
	for _, r := range rcpts {
		if !s.Rcpt(ctx, r).Refuses() {
			accepted++
		}
	}
	if ss.noData || accepted == 0 {
		s.Reset(ctx)
		return s
	}
	s.DataPost(ctx)
	return s
}

// counts reads the records of ip's four networks: "success/permfail" each.
func counts(t testing.TB, st store.Store, rule, ip string) [clientstats.Levels]string {
	t.Helper()
	keys, ok := clientstats.Keys(rule, netip.MustParseAddr(ip))
	if !ok {
		t.Fatalf("no keys for %s", ip)
	}
	recs, err := st.HGet(context.Background(), keys[:]...)
	if err != nil {
		t.Fatal(err)
	}
	var out [clientstats.Levels]string
	for i, r := range recs {
		if r == nil {
			out[i] = "-"
			continue
		}
		out[i] = strconv.FormatInt(r[clientstats.FieldSuccess], 10) + "/" + strconv.FormatInt(r[clientstats.FieldPermfail], 10)
	}
	return out
}

func all4(v string) [clientstats.Levels]string { return [clientstats.Levels]string{v, v, v, v} }

func TestRecording(t *testing.T) {
	tests := []struct {
		name     string
		plugins  string
		sessions []session
		ip       string // whose records to check
		want     [clientstats.Levels]string
	}{
		{
			name:     "an accepted message counts one success at every level",
			plugins:  "client_stats",
			sessions: []session{{ip: "192.0.2.7"}},
			ip:       "192.0.2.7", want: all4("1/0"),
		},
		{
			name:     "one success per message, not per recipient",
			plugins:  "client_stats",
			sessions: []session{{ip: "192.0.2.7", rcpts: []string{"a@example.test", "b@example.test"}}, {ip: "192.0.2.7"}},
			ip:       "192.0.2.7", want: all4("2/0"),
		},
		{
			name:     "every DENY answer is a permfail; the message still counts",
			plugins:  "client_stats\nstub rcpt bad1@example.test:DENY rcpt bad2@example.test:DENY",
			sessions: []session{{ip: "192.0.2.7", rcpts: []string{"bad1@example.test", "bad2@example.test", "good@example.test"}}},
			ip:       "192.0.2.7", want: all4("1/2"),
		},
		{
			name:     "DENY_DISCONNECT counts, the observer sees it whatever the rule order",
			plugins:  "stub rcpt bad@example.test:DENY_DISCONNECT\nclient_stats",
			sessions: []session{{ip: "192.0.2.7", rcpts: []string{"bad@example.test"}}},
			ip:       "192.0.2.7", want: all4("0/1"),
		},
		{
			name:     "DENYSOFT and DENYSOFT_DISCONNECT do not count",
			plugins:  "client_stats\nstub rcpt a@example.test:DENYSOFT rcpt b@example.test:DENYSOFT_DISCONNECT",
			sessions: []session{{ip: "192.0.2.7", rcpts: []string{"a@example.test", "b@example.test"}}},
			ip:       "192.0.2.7", want: all4("-"),
		},
		{
			name:     "a message refused at data_post by a later rule is a permfail, not a success",
			plugins:  "client_stats\nstub data_post DENY",
			sessions: []session{{ip: "192.0.2.7"}},
			ip:       "192.0.2.7", want: all4("0/1"),
		},
		{
			name:     "a message tempfailed at data_post counts nothing",
			plugins:  "client_stats\nstub data_post DENYSOFT",
			sessions: []session{{ip: "192.0.2.7"}},
			ip:       "192.0.2.7", want: all4("-"),
		},
		{
			name:     "a message accepted with OK by an earlier rule counts",
			plugins:  "stub data_post OK\nclient_stats",
			sessions: []session{{ip: "192.0.2.7"}},
			ip:       "192.0.2.7", want: all4("1/0"),
		},
		{
			name:     "a transaction reset before the message counts nothing",
			plugins:  "client_stats",
			sessions: []session{{ip: "192.0.2.7", noData: true}},
			ip:       "192.0.2.7", want: all4("-"),
		},
		{
			name:     "a dry-run DENY is not an answer the client saw",
			plugins:  "client_stats\nstub rcpt bad@example.test:DENY dry_run 1",
			sessions: []session{{ip: "192.0.2.7", rcpts: []string{"bad@example.test"}}},
			ip:       "192.0.2.7", want: all4("1/0"),
		},
		{
			name:    "neighbours add up in the shared networks only",
			plugins: "client_stats\nstub rcpt bad@example.test:DENY",
			sessions: []session{
				{ip: "192.0.2.7"},
				{ip: "192.0.2.8", rcpts: []string{"bad@example.test"}},
				{ip: "192.0.3.9", rcpts: []string{"bad@example.test"}},
				{ip: "192.1.0.1"},
			},
			ip: "192.0.2.7", want: [clientstats.Levels]string{"1/0", "1/1", "1/2", "2/2"},
		},
		{
			name:    "IPv6 levels /128, /64, /48, /32",
			plugins: "client_stats",
			sessions: []session{
				{ip: "2001:db8:1:2::1"},
				{ip: "2001:db8:1:2::2"},
				{ip: "2001:db8:1:3::1"},
				{ip: "2001:db8:2::1"},
			},
			ip: "2001:db8:1:2::1", want: [clientstats.Levels]string{"1/0", "2/0", "3/0", "4/0"},
		},
		{
			name:     "an IPv4-mapped client is the IPv4 client",
			plugins:  "client_stats",
			sessions: []session{{ip: "::ffff:192.0.2.7"}},
			ip:       "192.0.2.7", want: all4("1/0"),
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := rulestest.New(t, tc.plugins, nil)
			for _, ss := range tc.sessions {
				run(h, ss)
			}
			if got := counts(t, h.Store, "client_stats", tc.ip); got != tc.want {
				t.Fatalf("records of %s (/32|/128 first): %v, want %v", tc.ip, got, tc.want)
			}
		})
	}
}

func TestNoteHoldsMostSpecificNetwork(t *testing.T) {
	// seed gives each network (by its prefix) success/permfail counts.
	type seed struct {
		network           string
		success, permfail int64
	}
	tests := []struct {
		name  string
		ip    string
		seeds []seed
		want  clientstats.Stats
	}{
		{name: "unknown client: its own /32 with zero counts", ip: "192.0.2.7",
			want: clientstats.Stats{Network: netip.MustParsePrefix("192.0.2.7/32")}},
		{name: "unknown IPv6 client: its /128", ip: "2001:db8::1",
			want: clientstats.Stats{Network: netip.MustParsePrefix("2001:db8::1/128")}},
		{name: "only the /16 is known", ip: "192.0.2.7", seeds: []seed{{"192.0.0.0/16", 3, 4}},
			want: clientstats.Stats{Network: netip.MustParsePrefix("192.0.0.0/16"), Success: 3, Permfail: 4}},
		{name: "the /24 wins over the /8", ip: "192.0.2.7", seeds: []seed{{"192.0.0.0/8", 100, 0}, {"192.0.2.0/24", 0, 5}},
			want: clientstats.Stats{Network: netip.MustParsePrefix("192.0.2.0/24"), Permfail: 5}},
		{name: "the client itself wins", ip: "192.0.2.7", seeds: []seed{{"192.0.2.0/24", 0, 5}, {"192.0.2.7/32", 2, 0}},
			want: clientstats.Stats{Network: netip.MustParsePrefix("192.0.2.7/32"), Success: 2}},
		{name: "IPv6 /48 known", ip: "2001:db8:1:2::1", seeds: []seed{{"2001:db8:1::/48", 1, 9}},
			want: clientstats.Stats{Network: netip.MustParsePrefix("2001:db8:1::/48"), Success: 1, Permfail: 9}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := rulestest.New(t, "client_stats", nil)
			for _, sd := range tc.seeds {
				p := netip.MustParsePrefix(sd.network)
				keys, _ := clientstats.Keys("client_stats", p.Addr())
				nets, _ := clientstats.Networks(p.Addr())
				for i, n := range nets {
					if n == p {
						err := h.Store.HIncr(context.Background(), time.Hour,
							store.FieldIncr{Key: keys[i], Field: clientstats.FieldSuccess, Delta: sd.success},
							store.FieldIncr{Key: keys[i], Field: clientstats.FieldPermfail, Delta: sd.permfail})
						if err != nil {
							t.Fatal(err)
						}
					}
				}
			}
			s, d := h.Connect(tc.ip)
			if d.Code != rules.Declined {
				t.Fatalf("connect answered %v", d.Code)
			}
			got, ok := clientstats.FromSession(s.Session)
			if !ok || got != tc.want {
				t.Fatalf("note: %+v (%v), want %+v", got, ok, tc.want)
			}
			if got.Known() != (tc.want.Success+tc.want.Permfail > 0) {
				t.Fatalf("Known() = %v", got.Known())
			}
		})
	}
}

func TestExpiry(t *testing.T) {
	h := rulestest.New(t, "client_stats expire 1h", nil)
	run(h, session{ip: "192.0.2.7"})
	h.Clock.Advance(59 * time.Minute)
	run(h, session{ip: "192.0.3.1"}) // renews the /16 and /8 only
	h.Clock.Advance(time.Minute - time.Nanosecond)
	if got, want := counts(t, h.Store, "client_stats", "192.0.2.7"), [clientstats.Levels]string{"1/0", "1/0", "2/0", "2/0"}; got != want {
		t.Fatalf("just before expiry: %v, want %v", got, want)
	}
	h.Clock.Advance(time.Nanosecond) // exactly 1h after the first write
	if got, want := counts(t, h.Store, "client_stats", "192.0.2.7"), [clientstats.Levels]string{"-", "-", "2/0", "2/0"}; got != want {
		t.Fatalf("at expiry: %v, want %v", got, want)
	}
	s, _ := h.Connect("192.0.2.7")
	if st, _ := clientstats.FromSession(s.Session); st.Network.String() != "192.0.0.0/16" || st.Success != 2 {
		t.Fatalf("note after the /32 and /24 expired: %+v", st)
	}
}

func TestKeys(t *testing.T) {
	for ip, want := range map[string][clientstats.Levels]string{
		"192.0.2.7": {
			"policyd:{192.0.0.0/8}:client_stats:@192.0.2.7/32",
			"policyd:{192.0.0.0/8}:client_stats:@192.0.2.0/24",
			"policyd:{192.0.0.0/8}:client_stats:@192.0.0.0/16",
			"policyd:{192.0.0.0/8}:client_stats:@192.0.0.0/8",
		},
		"2001:db8:1:2::7": {
			"policyd:{2001:db8::/32}:client_stats:@2001:db8:1:2::7/128",
			"policyd:{2001:db8::/32}:client_stats:@2001:db8:1:2::/64",
			"policyd:{2001:db8::/32}:client_stats:@2001:db8:1::/48",
			"policyd:{2001:db8::/32}:client_stats:@2001:db8::/32",
		},
	} {
		got, ok := clientstats.Keys("client_stats", netip.MustParseAddr(ip))
		if !ok || got != want {
			t.Errorf("Keys(%s) = %q, want %q", ip, got, want)
		}
		if err := store.SameTag(got[:]...); err != nil {
			t.Errorf("Keys(%s): %v", ip, err)
		}
	}
	if _, ok := clientstats.Keys("client_stats", netip.Addr{}); ok {
		t.Error("Keys of an invalid address")
	}
}

func TestInvalidClientIsSkipped(t *testing.T) {
	h := rulestest.New(t, "client_stats", nil)
	s := rules.NewConversation(h.Chain, "test", netip.Addr{}, 0, h.Clock.Now())
	if d := s.Connect(context.Background()); d.Code != rules.Declined {
		t.Fatalf("connect: %v", d.Code)
	}
	if _, ok := clientstats.FromSession(s.Session); ok {
		t.Fatal("note set for a client without an address")
	}
	s.Mail(context.Background(), rules.MailFrom{})
	s.Rcpt(context.Background(), "user@example.test")
	if d := s.DataPost(context.Background()); d.Code != rules.Declined || h.Chain.Errors() != 0 {
		t.Fatalf("data_post: %v, errors %d", d.Code, h.Chain.Errors())
	}
}

func TestOneStoreCallPerEvent(t *testing.T) {
	clock := rulestest.NewClock()
	mem := memory.New(memory.Options{Now: clock.Now, SweepInterval: -1})
	t.Cleanup(func() { _ = mem.Close() })
	st := rulestest.NewCountingStore(mem)
	fsys := fstest.MapFS{"plugins": {Data: []byte("client_stats\nstub rcpt bad@example.test:DENY\n")}}
	c, _, err := rules.Load(fsys, "config", rules.Options{Store: st, Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	s := rules.NewConversation(c, "test", netip.MustParseAddr("192.0.2.7"), 1, clock.Now())
	s.Connect(ctx)
	if calls := st.Calls(); calls["HGet"] != 1 || len(calls) != 1 {
		t.Fatalf("connect: %v, want one HGet", calls)
	}
	s.Mail(ctx, rules.MailFrom{})
	s.Rcpt(ctx, "bad@example.test")
	if calls := st.Calls(); calls["HIncr"] != 1 {
		t.Fatalf("one DENY: %v, want one HIncr", calls)
	}
	s.Rcpt(ctx, "good@example.test")
	s.DataPost(ctx)
	s.End(ctx)
	if calls := st.Calls(); calls["HIncr"] != 2 || len(calls) != 2 {
		t.Fatalf("after the message: %v, want two HIncr and one HGet", calls)
	}
}

func TestConfigErrors(t *testing.T) {
	for _, tc := range []struct{ plugins, file, want string }{
		{plugins: "client_stats expire 10", want: "config/plugins:1: client_stats: expire: 10s is out of range [1h0m0s, 87600h0m0s]"},
		{plugins: "client_stats", file: "expire 30d\n", want: `config/client_stats:1: client_stats: expire: "30d" is not a duration (seconds, or like 90s, 15m, 12h)`},
		{plugins: "client_stats", file: "# stats\nexpire 720h\nlevels 4\n", want: `config/client_stats:3: client_stats: unknown key "levels"`},
	} {
		fsys := fstest.MapFS{"plugins": {Data: []byte(tc.plugins + "\n")}}
		if tc.file != "" {
			fsys["client_stats"] = &fstest.MapFile{Data: []byte(tc.file)}
		}
		_, _, err := rules.Load(fsys, "config", rules.Options{})
		if err == nil || err.Error() != tc.want {
			t.Errorf("%q / %q:\n got %v\nwant %s", tc.plugins, tc.file, err, tc.want)
		}
	}
}

func BenchmarkConnect(b *testing.B) {
	h := rulestest.New(b, "client_stats", nil)
	run(h, session{ip: "192.0.2.8"})
	s := h.Session("192.0.2.7")
	b.ReportAllocs()
	for b.Loop() {
		h.Run(rules.HookConnect, s)
	}
}

// BenchmarkRecordMessage is the end of an accepted message: data_post
// marks it, the reset records it in one HIncr.
func BenchmarkRecordMessage(b *testing.B) {
	h := rulestest.New(b, "client_stats", nil)
	s := h.Session("192.0.2.7")
	s.Connect(context.Background())
	s.Begin("1")
	b.ReportAllocs()
	for b.Loop() {
		h.Run(rules.HookDataPost, s)
		h.Run(rules.HookResetTransaction, s)
	}
}
