package all_test

import (
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/testing/testredis"
	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/rules/rulestest"
	"github.com/policyd-mail/policyd/store"
	redisstore "github.com/policyd-mail/policyd/store/redis"
)

// far is Redis on another host: every call waits rtt more.
type far struct {
	store.Store
	rtt time.Duration
}

func (f far) Incr(ctx context.Context, key string, delta int64, ttl time.Duration) (int64, error) {
	time.Sleep(f.rtt)
	return f.Store.Incr(ctx, key, delta, ttl)
}

func (f far) HGet(ctx context.Context, keys ...string) ([]map[string]int64, error) {
	time.Sleep(f.rtt)
	return f.Store.HGet(ctx, keys...)
}

// BenchmarkConnectRoundTrips is the session start of the bench chain on
// a real Redis made 2 ms away, with read-ahead and without: trips/op is
// how many round trips in a row a new session waits for (its time over
// that of one call, measured first), the figure issue 19 asks to bring
// to one.
func BenchmarkConnectRoundTrips(b *testing.B) {
	srv := testredis.Start(b)
	const rtt = 2 * time.Millisecond
	plugins := "whitelist\nconnection_shaper threshold 1000000000 exptime 60\nclient_stats\ndeny_repeat_offenders threshold 1000000\n"
	for _, ahead := range []bool{false, true} {
		b.Run(fmt.Sprintf("read-ahead=%v", ahead), func(b *testing.B) {
			st, err := redisstore.Open(srv.URL(), redisstore.Options{Timeout: time.Second, Batch: true})
			if err != nil {
				b.Fatal(err)
			}
			h := rulestest.NewWith(b, plugins, nil, rulestest.Options{Store: far{st, rtt}, ReadAhead: ahead})
			ctx := context.Background()
			start := time.Now()
			for range 50 {
				if _, err := h.Store.Incr(ctx, store.Key("192.0.2.1", "bench", "trip"), 1, time.Minute); err != nil {
					b.Fatal(err)
				}
			}
			trip := time.Since(start) / 50
			b.ResetTimer()
			i := 0
			for b.Loop() {
				a := netip.AddrFrom4([4]byte{10, 0, byte(i >> 8), byte(i)})
				s := rules.NewConversation(h.Chain, "bench", a, 40000+i%1000, h.Clock.Now())
				if d := s.Connect(ctx); d.Code != rules.Declined {
					b.Fatalf("connect: %v %s", d.Code, d.Text)
				}
				i++
			}
			b.ReportMetric(float64(b.Elapsed())/float64(b.N)/float64(trip), "trips/op")
		})
	}
}
