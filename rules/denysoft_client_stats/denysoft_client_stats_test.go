package denysoftclientstats_test

import (
	"context"
	"math"
	"net/netip"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/policyd-mail/policyd/rules"
	clientstats "github.com/policyd-mail/policyd/rules/client_stats"
	denysoftclientstats "github.com/policyd-mail/policyd/rules/denysoft_client_stats"
	"github.com/policyd-mail/policyd/rules/rulestest"
	_ "github.com/policyd-mail/policyd/rules/whitelist"
	"github.com/policyd-mail/policyd/store"
)

// record gives network (one of a client's levels) success and permfail
// counts in client_stats' records.
type record struct {
	network           string
	success, permfail int64
}

func seedStats(t testing.TB, st store.Store, recs ...record) {
	t.Helper()
	for _, r := range recs {
		p := netip.MustParsePrefix(r.network)
		keys, _ := clientstats.Keys("client_stats", p.Addr())
		nets, _ := clientstats.Networks(p.Addr())
		found := false
		for i, n := range nets {
			if n != p {
				continue
			}
			found = true
			err := st.HIncr(context.Background(), time.Hour,
				store.FieldIncr{Key: keys[i], Field: clientstats.FieldSuccess, Delta: r.success},
				store.FieldIncr{Key: keys[i], Field: clientstats.FieldPermfail, Delta: r.permfail})
			if err != nil {
				t.Fatal(err)
			}
		}
		if !found {
			t.Fatalf("%s is not a client_stats level", r.network)
		}
	}
}

// draws makes the rules built next draw vals in order, and counts the
// draws taken.
func draws(t *testing.T, vals ...float64) *int {
	t.Helper()
	n := new(int)
	restore := denysoftclientstats.SetDraw(func() float64 {
		*n++
		if *n > len(vals) {
			t.Fatalf("draw %d: only %d planned", *n, len(vals))
			return 1
		}
		return vals[*n-1]
	})
	t.Cleanup(restore)
	return n
}

func TestDenysoftClientStats(t *testing.T) {
	tests := []struct {
		name        string
		plugins     string
		records     []record
		ip          string
		rcpts       int
		draws       []float64
		wantConnect rules.Code
		wantRcpt    []rules.Code // one per recipient
		wantText    string       // of the first refusal
		wantDraws   int
	}{
		{
			name:    "biases 0 and only permfails in the /24: a new client is refused for sure",
			plugins: "client_stats\ndenysoft_client_stats success_bias 0 permfail_bias 0",
			records: []record{{"192.0.2.0/24", 0, 5}, {"192.0.0.0/8", 100, 5}},
			ip:      "192.0.2.200", rcpts: 1, draws: []float64{0.999},
			wantRcpt:  []rules.Code{rules.DenySoft},
			wantText:  "5 permanent failures, 0 successful deliveries from 192.0.2.0/24: Rejecting with probability 1",
			wantDraws: 1,
		},
		{
			name:    "permfail_bias 0 and only successes: p is 0, nothing is drawn",
			plugins: "client_stats\ndenysoft_client_stats permfail_bias 0",
			records: []record{{"192.0.2.7/32", 3, 0}},
			ip:      "192.0.2.7", rcpts: 2,
			wantRcpt: []rules.Code{rules.Declined, rules.Declined},
		},
		{
			name:    "both biases 0 and nothing known: p is 0",
			plugins: "client_stats\ndenysoft_client_stats success_bias 0 permfail_bias 0",
			ip:      "192.0.2.7", rcpts: 1,
			wantRcpt: []rules.Code{rules.Declined},
		},
		{
			name:    "a stranger with the default biases: p = 1/2, a draw below it refuses",
			plugins: "client_stats\ndenysoft_client_stats",
			ip:      "192.0.2.7", rcpts: 1, draws: []float64{0.4999},
			wantRcpt:  []rules.Code{rules.DenySoft},
			wantText:  "0 permanent failures, 0 successful deliveries from 192.0.2.7/32: Rejecting with probability 0.5",
			wantDraws: 1,
		},
		{
			name:    "a draw equal to p passes",
			plugins: "client_stats\ndenysoft_client_stats",
			ip:      "192.0.2.7", rcpts: 1, draws: []float64{0.5},
			wantRcpt: []rules.Code{rules.Declined}, wantDraws: 1,
		},
		{
			name:    "the seed's formula with biases: (2+1)/(2+1+6+1) = 0.3",
			plugins: "client_stats\ndenysoft_client_stats",
			records: []record{{"192.0.0.0/16", 6, 2}},
			ip:      "192.0.2.7", rcpts: 2, draws: []float64{0.29},
			wantRcpt:  []rules.Code{rules.DenySoft, rules.DenySoft},
			wantText:  "2 permanent failures, 6 successful deliveries from 192.0.0.0/16: Rejecting with probability 0.3",
			wantDraws: 1,
		},
		{
			name:    "IPv6: the /48 decides",
			plugins: "client_stats\ndenysoft_client_stats success_bias 3",
			records: []record{{"2001:db8:1::/48", 0, 1}},
			ip:      "2001:db8:1:2::9", rcpts: 1, draws: []float64{0.3},
			wantRcpt:  []rules.Code{rules.DenySoft},
			wantText:  "1 permanent failures, 0 successful deliveries from 2001:db8:1::/48: Rejecting with probability 0.4",
			wantDraws: 1,
		},
		{
			name:    "once per session: the first recipient's draw holds for the others",
			plugins: "client_stats\ndenysoft_client_stats",
			ip:      "192.0.2.7", rcpts: 3, draws: []float64{0.9, 0.1, 0.1},
			wantRcpt:  []rules.Code{rules.Declined, rules.Declined, rules.Declined},
			wantDraws: 1,
		},
		{
			name:    "per_recipient 1 draws for every recipient",
			plugins: "client_stats\ndenysoft_client_stats per_recipient 1",
			ip:      "192.0.2.7", rcpts: 3, draws: []float64{0.9, 0.1, 0.6},
			wantRcpt:  []rules.Code{rules.Declined, rules.DenySoft, rules.Declined},
			wantText:  "0 permanent failures, 0 successful deliveries from 192.0.2.7/32: Rejecting with probability 0.5",
			wantDraws: 3,
		},
		{
			name:    "at_connect refuses at connect and hangs up",
			plugins: "client_stats\ndenysoft_client_stats at_connect 1",
			records: []record{{"192.0.2.0/24", 1, 3}},
			ip:      "192.0.2.7", draws: []float64{0.5},
			wantConnect: rules.DenySoftDisconnect,
			wantText:    "3 permanent failures, 1 successful deliveries from 192.0.2.0/24: Rejecting with probability 0.667",
			wantDraws:   1,
		},
		{
			name:    "at_connect passing: recipients are not asked again",
			plugins: "client_stats\ndenysoft_client_stats at_connect 1",
			ip:      "192.0.2.7", rcpts: 2, draws: []float64{0.7},
			wantRcpt: []rules.Code{rules.Declined, rules.Declined}, wantDraws: 1,
		},
		{
			name:    "whitelisted clients are never drawn",
			plugins: "whitelist clients 192.0.2.0/24\nclient_stats\ndenysoft_client_stats success_bias 0 permfail_bias 0",
			records: []record{{"192.0.2.0/24", 0, 5}},
			ip:      "192.0.2.7", rcpts: 1,
			wantRcpt: []rules.Code{rules.Declined},
		},
		{
			name:    "without client_stats there is no note: DECLINED",
			plugins: "denysoft_client_stats success_bias 0",
			ip:      "192.0.2.7", rcpts: 1,
			wantRcpt: []rules.Code{rules.Declined},
		},
		{
			name:    "at RCPT the order does not matter: client_stats' connect has run",
			plugins: "denysoft_client_stats success_bias 0 permfail_bias 0\nclient_stats",
			records: []record{{"192.0.2.0/24", 0, 5}},
			ip:      "192.0.2.7", rcpts: 1, draws: []float64{0.5},
			wantRcpt: []rules.Code{rules.DenySoft}, wantDraws: 1,
			wantText: "5 permanent failures, 0 successful deliveries from 192.0.2.0/24: Rejecting with probability 1",
		},
		{
			name:    "at connect it does: client_stats after it leaves no note yet",
			plugins: "denysoft_client_stats at_connect 1 success_bias 0 permfail_bias 0\nclient_stats",
			records: []record{{"192.0.2.0/24", 0, 5}},
			ip:      "192.0.2.7", rcpts: 1,
			wantRcpt: []rules.Code{rules.Declined},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			n := draws(t, tc.draws...)
			h := rulestest.New(t, tc.plugins, nil)
			seedStats(t, h.Store, tc.records...)
			ctx := context.Background()
			s := h.Session(tc.ip)
			var first *rules.Decision
			d := s.Connect(ctx)
			if d.Code != tc.wantConnect {
				t.Fatalf("connect: %v (%q), want %v", d.Code, d.Text, tc.wantConnect)
			}
			if d.Code.IsDeny() {
				first = &d
				if d.Reply.Code != 421 || d.Reply.Enhanced != "4.7.0" {
					t.Fatalf("connect reply %q", d.Reply)
				}
			}
			if d.Code == rules.Declined {
				s.Mail(ctx, rules.MailFrom{Sender: "sender@example.org"})
				var got []rules.Code
				for range tc.rcpts {
					d := s.Rcpt(ctx, "user@example.test")
					got = append(got, d.Code)
					if d.Code.IsDeny() && first == nil {
						first = &d
						if d.Reply.Code != 450 || d.Reply.Enhanced != "4.7.1" {
							t.Fatalf("rcpt reply %q", d.Reply)
						}
					}
				}
				if !equal(got, tc.wantRcpt) {
					t.Fatalf("rcpt answers %v, want %v", got, tc.wantRcpt)
				}
			}
			if tc.wantText != "" && (first == nil || first.Text != tc.wantText) {
				t.Fatalf("text: %+v\nwant %q", first, tc.wantText)
			}
			if *n != tc.wantDraws {
				t.Fatalf("%d draws, want %d", *n, tc.wantDraws)
			}
		})
	}
}

func equal(a, b []rules.Code) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestMissingNoteWarnsOnce(t *testing.T) {
	h := rulestest.New(t, "denysoft_client_stats", nil)
	for range 3 {
		_, d := h.Connect("192.0.2.7")
		if d.Code != rules.Declined {
			t.Fatal(d.Code)
		}
		s := h.Session("192.0.2.7")
		s.Connect(context.Background())
		s.Mail(context.Background(), rules.MailFrom{})
		if d := s.Rcpt(context.Background(), "user@example.test"); d.Code != rules.Declined {
			t.Fatal(d.Code)
		}
	}
	if n := strings.Count(h.Logs.String(), "no client_stats note"); n != 1 {
		t.Fatalf("%d warnings, want 1:\n%s", n, h.Logs)
	}
}

// TestRefusalRate draws from the real random source: a new client in a
// network with a bad record is refused at a rate close to p.
func TestRefusalRate(t *testing.T) {
	for _, tc := range []struct {
		plugins string
		rec     record
		p       float64
	}{
		{"client_stats\ndenysoft_client_stats", record{"192.0.2.0/24", 1, 3}, 4.0 / 6},
		{"client_stats\ndenysoft_client_stats", record{"192.0.2.0/24", 0, 0}, 0.5},
		{"client_stats\ndenysoft_client_stats success_bias 10 per_recipient 1", record{"192.0.0.0/16", 5, 2}, 3.0 / 18},
	} {
		h := rulestest.New(t, tc.plugins, nil)
		if tc.rec.success+tc.rec.permfail > 0 {
			seedStats(t, h.Store, tc.rec)
		}
		const n = 10000
		refused := 0
		ctx := context.Background()
		for i := range n {
			s := h.Session(netip.AddrFrom4([4]byte{192, 0, 2, byte(1 + i%250)}).String())
			s.Connect(ctx)
			s.Mail(ctx, rules.MailFrom{})
			if s.Rcpt(ctx, "user@example.test").Code == rules.DenySoft {
				refused++
			}
			s.End(ctx) // no message: nothing new is recorded
		}
		sd := math.Sqrt(n * tc.p * (1 - tc.p))
		// Five standard deviations: a false alarm about once in 1.7 million runs.
		if got := float64(refused); math.Abs(got-n*tc.p) > 5*sd {
			t.Errorf("%q with %+v: refused %d of %d, want %.0f ± %.0f", tc.plugins, tc.rec, refused, n, n*tc.p, 5*sd)
		}
	}
}

// TestSeedIsReproducible: the same seed gives the same refusals, another
// seed other ones.
func TestSeedIsReproducible(t *testing.T) {
	pattern := func(seed string) string {
		h := rulestest.New(t, "client_stats\ndenysoft_client_stats per_recipient 1 seed "+seed, nil)
		s, _ := h.Connect("192.0.2.7")
		s.Mail(context.Background(), rules.MailFrom{})
		var b strings.Builder
		for range 64 {
			if s.Rcpt(context.Background(), "user@example.test").Refuses() {
				b.WriteByte('x')
			} else {
				b.WriteByte('.')
			}
		}
		return b.String()
	}
	a, b, c := pattern("42"), pattern("42"), pattern("43")
	if a != b {
		t.Fatalf("seed 42 twice:\n%s\n%s", a, b)
	}
	if a == c {
		t.Fatalf("seeds 42 and 43 agree: %s", a)
	}
	if !strings.Contains(a, "x") || !strings.Contains(a, ".") {
		t.Fatalf("64 draws at p=0.5 all alike: %s", a)
	}
}

func TestProbability(t *testing.T) {
	for _, tc := range []struct {
		st      clientstats.Stats
		pfb, sb int64
		want    float64
	}{
		{clientstats.Stats{}, 1, 1, 0.5},
		{clientstats.Stats{}, 0, 0, 0},
		{clientstats.Stats{Permfail: 9}, 1, 1, 10.0 / 11},
		{clientstats.Stats{Success: 9}, 1, 1, 1.0 / 11},
		{clientstats.Stats{Success: 3, Permfail: 1}, 0, 0, 0.25},
	} {
		if got := denysoftclientstats.Probability(tc.st, tc.pfb, tc.sb); math.Abs(got-tc.want) > 1e-12 {
			t.Errorf("Probability(%+v, %d, %d) = %v, want %v", tc.st, tc.pfb, tc.sb, got, tc.want)
		}
	}
}

func TestConfig(t *testing.T) {
	for _, tc := range []struct{ plugins, file, want string }{
		{plugins: "denysoft_client_stats success_bias -1", want: "config/plugins:1: denysoft_client_stats: success_bias: -1 is out of range [0, 1000000]"},
		{plugins: "denysoft_client_stats", file: "at_connect 1\npermfail_bias 0.5\n", want: `config/denysoft_client_stats:2: denysoft_client_stats: permfail_bias: "0.5" is not a whole number`},
		{plugins: "denysoft_client_stats", file: "per_recipient maybe\n", want: `config/denysoft_client_stats:1: denysoft_client_stats: per_recipient: "maybe" is not a boolean (use 1 or 0)`},
		{plugins: "denysoft_client_stats", file: "skip 1\n", want: `config/denysoft_client_stats:1: denysoft_client_stats: unknown key "skip"`},
	} {
		fsys := fstest.MapFS{"plugins": {Data: []byte(tc.plugins + "\n")}}
		if tc.file != "" {
			fsys["denysoft_client_stats"] = &fstest.MapFile{Data: []byte(tc.file)}
		}
		_, _, err := rules.Load(fsys, "config", rules.Options{})
		if err == nil || err.Error() != tc.want {
			t.Errorf("%q / %q:\n got %v\nwant %s", tc.plugins, tc.file, err, tc.want)
		}
	}
	fsys := fstest.MapFS{"plugins": {Data: []byte("client_stats\ndenysoft_client_stats at_connect 1 per_recipient 1\n")}}
	_, warns, err := rules.Load(fsys, "config", rules.Options{})
	want := "config/plugins:2: warning: denysoft_client_stats: per_recipient has no effect with at_connect 1: the draw happens once, at connect"
	if err != nil || len(warns) != 1 || warns[0].Error() != want {
		t.Fatalf("err %v, warnings %v\nwant %s", err, warns, want)
	}
}

func BenchmarkRcpt(b *testing.B) {
	h := rulestest.New(b, "client_stats\ndenysoft_client_stats per_recipient 1", nil)
	s, _ := h.Connect("192.0.2.7")
	s.Begin("1").Rcpt = "user@example.test"
	b.ReportAllocs()
	for b.Loop() {
		h.Run(rules.HookRcpt, s)
	}
}
