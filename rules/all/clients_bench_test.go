package all_test

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/store/memory"
)

// benchPlugins is the chain of `make bench`: every client leaves a
// session counter, four client_stats records and, for one in ten, an
// offender record in the store.
const benchPlugins = "whitelist\nconnection_shaper threshold 1000000\nclient_stats\ndeny_repeat_offenders threshold 1000000\nbadrcptto recipient trap@example.test\n"

// BenchmarkClients runs whole SMTP sessions through the bench chain on
// the persisted embedded store holding 1 000 and 1 000 000 distinct
// clients (issue 5: latency must not grow with the number of clients,
// and a million clients fit in 200 MB). It reports the process's RSS and
// the live heap after the store was filled. With b.Loop the store is
// filled once per size; the 1M fill takes a minute.
func BenchmarkClients(b *testing.B) {
	for _, n := range []int{1_000, 1_000_000} {
		b.Run(fmt.Sprintf("clients=%d", n), func(b *testing.B) {
			st, err := memory.Open(memory.Options{Dir: b.TempDir()})
			if err != nil {
				b.Fatal(err)
			}
			defer st.Close()
			// Not rulestest: its harness keeps every log line in memory.
			c, _, err := rules.Load(fstest.MapFS{"plugins": {Data: []byte(benchPlugins)}}, "bench", rules.Options{
				Store: st, Logger: slog.New(slog.DiscardHandler)})
			if err != nil {
				b.Fatal(err)
			}
			addrs := make([]netip.Addr, n)
			for i := range addrs {
				// Consecutive addresses from 10.0.0.0: many /24s and
				// /16s, so client_stats' network records are many too.
				v := uint32(i)
				addrs[i] = netip.AddrFrom4([4]byte{10 + byte(v>>24), byte(v >> 16), byte(v >> 8), byte(v)})
				session(b, c, addrs[i], i)
			}
			runtime.GC()
			var ms runtime.MemStats
			runtime.ReadMemStats(&ms)
			rng := rand.New(rand.NewPCG(1, 2))
			b.ReportAllocs()
			b.ResetTimer()
			i := 0
			for b.Loop() {
				session(b, c, addrs[rng.IntN(n)], i)
				i++
			}
			b.StopTimer()
			b.ReportMetric(float64(ms.HeapAlloc)/(1<<20), "heap-MB")
			b.ReportMetric(rssMB(), "RSS-MB")
		})
	}
}

// session is one accepted message, and for one session in ten a refused
// recipient the deny observers count.
func session(b *testing.B, c *rules.Chain, a netip.Addr, i int) {
	ctx := context.Background()
	s := rules.NewConversation(c, "bench", a, 40000, c.Now())
	s.Connect(ctx)
	s.Helo(ctx, "client.example")
	s.Mail(ctx, rules.MailFrom{Sender: "s@example.org", ID: strconv.Itoa(i)})
	if i%10 == 0 {
		if d := s.Rcpt(ctx, "trap@example.test"); !d.Refuses() {
			b.Fatalf("session %d: the trap recipient was accepted", i)
		}
		s.End(ctx)
		return
	}
	s.Rcpt(ctx, "r@example.test")
	if d := s.Data(ctx); d.Refuses() {
		b.Fatalf("session %d of %s refused at DATA: %v", i, a, d)
	}
	s.DataPost(ctx)
	s.End(ctx)
}

// rssMB is the process's resident set, from /proc (0 where there is none).
func rssMB() float64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, l := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			kb, _ := strconv.ParseFloat(strings.TrimSuffix(strings.TrimSpace(rest), " kB"), 64)
			return kb / 1024
		}
	}
	return 0
}
