package ratelimit_test

import (
	"context"
	"fmt"
	"net/netip"
	"runtime"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/policyd-mail/policyd/internal/testing/testredis"
	"github.com/policyd-mail/policyd/rules"
	_ "github.com/policyd-mail/policyd/rules/connection_shaper"
	_ "github.com/policyd-mail/policyd/rules/greylisting"
	"github.com/policyd-mail/policyd/rules/rulestest"
	"github.com/policyd-mail/policyd/store"
	"github.com/policyd-mail/policyd/store/memory"
	redisstore "github.com/policyd-mail/policyd/store/redis"
)

// The budget combinations of the benchmarks; none is ever spent.
var benchChains = []struct{ name, plugins string }{
	// The baseline: a rule with one store call per RCPT of its own
	// (greylisting's SetNX), to read the others as ratios of it.
	{"baseline-greylisting", "greylisting mode testonly auto_whitelist 0"},
	{"messages", "ratelimit key sasl_username messages 1000000000/1h"},
	{"messages+recipients", "ratelimit key sasl_username messages 1000000000/1h recipients 1000000000/1h"},
	{"all3", "ratelimit key sasl_username messages 1000000000/1h recipients 1000000000/1h bytes 1000G/1h"},
	{"compound", "ratelimit key sasl_username,recipient_domain messages 1000000000/1h recipients 1000000000/1h"},
}

// benchRcpt measures one message of one recipient, MAIL and RCPT, from
// one of 1000 logins, on st; it reports the store calls per RCPT.
func benchRcpt(b *testing.B, plugins string, st store.Store) {
	clock := rulestest.NewClock()
	counting := rulestest.NewCountingStore(st)
	c, _, err := rules.Load(fstest.MapFS{"plugins": {Data: []byte(plugins)}}, "config", rules.Options{Store: counting, Clock: clock})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	s := rules.NewConversation(c, "bench", netip.MustParseAddr("192.0.2.1"), 1, clock.Now())
	s.Connect(ctx)
	users := make([]string, 1000)
	for i := range users {
		users[i] = fmt.Sprintf("user%d@example.org", i)
	}
	b.ReportAllocs()
	b.ResetTimer()
	before := counting.Total()
	i := 0
	for b.Loop() {
		// Greylisting skips authenticated sessions: the baseline's have
		// no login, and its senders vary as the logins do.
		if !strings.HasPrefix(plugins, "greylisting") {
			s.AuthUser = users[i%len(users)]
		}
		s.Mail(ctx, rules.MailFrom{Sender: users[i%len(users)]})
		i++
		s.Txn.Size = 5000
		if d := s.Rcpt(ctx, "b@example.net"); d.Refuses() {
			b.Fatalf("refused: %s", d.Text)
		}
	}
	b.ReportMetric(float64(counting.Total()-before)/float64(i), "calls/rcpt")
}

func BenchmarkRcptMemory(b *testing.B) {
	for _, bc := range benchChains {
		b.Run(bc.name, func(b *testing.B) {
			st := memory.New(memory.Options{SweepInterval: -1})
			defer st.Close()
			benchRcpt(b, bc.plugins, st)
		})
	}
}

func BenchmarkRcptRedis(b *testing.B) {
	srv := testredis.Start(b)
	for _, bc := range benchChains {
		b.Run(bc.name, func(b *testing.B) {
			srv.MustDo("FLUSHALL")
			st, err := redisstore.Open(srv.URL(), redisstore.Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer st.Close()
			benchRcpt(b, bc.plugins, st)
		})
	}
}

// BenchmarkMillionSenders fills the embedded store with one messages
// budget for each of a million senders and reports the store's bytes
// per sender (its records live outside the Go heap, in mmaps), beside a
// baseline in the same run: connection_shaper's counter for each of a
// million client addresses. Run it once:
// go test -run X -bench MillionSenders -benchtime 1x ./rules/ratelimit/
func BenchmarkMillionSenders(b *testing.B) {
	const n = 1_000_000
	for _, bc := range []struct {
		name, plugins string
		client        func(i int) netip.Addr
		sender        func(i int) string
	}{
		{"baseline-connection_shaper-clients", "connection_shaper threshold 1000",
			func(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}) },
			func(int) string { return "a@example.org" }},
		{"ratelimit-senders", "ratelimit key sender messages 100/1h",
			func(int) netip.Addr { return netip.MustParseAddr("192.0.2.1") },
			func(i int) string { return fmt.Sprintf("sender%07d@example.org", i) }},
	} {
		b.Run(bc.name, func(b *testing.B) {
			for b.Loop() {
				clock := rulestest.NewClock()
				st := memory.New(memory.Options{SweepInterval: -1, Now: clock.Now})
				c, _, err := rules.Load(fstest.MapFS{"plugins": {Data: []byte(bc.plugins)}}, "config", rules.Options{Store: st, Clock: clock})
				if err != nil {
					b.Fatal(err)
				}
				ctx := context.Background()
				for i := range n {
					s := rules.NewConversation(c, "bench", bc.client(i), 1, clock.Now())
					s.Connect(ctx)
					s.Mail(ctx, rules.MailFrom{Sender: bc.sender(i)})
					s.Rcpt(ctx, "r@example.net")
					s.End(ctx)
				}
				stats := st.Stats()
				if stats.Records != n {
					b.Fatalf("%d records, want %d", stats.Records, n)
				}
				b.ReportMetric(float64(stats.IndexBytes+stats.RecordBytes)/n, "storeB/record")
				b.ReportMetric(float64(heap())/n, "heapB/record")
				st.Close()
			}
		})
	}
}

func heap() uint64 {
	runtime.GC()
	var m runtime.MemStats
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}
