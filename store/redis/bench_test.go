package redis

import (
	"context"
	"errors"
	"log/slog"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/testing/testredis"
	"github.com/policyd-mail/policyd/store"
)

// benchStore opens a Store on a fresh local redis-server.
func benchStore(b *testing.B) (*Store, *testredis.Server) {
	b.Helper()
	// The probes' failed dials while Redis is down would print on every
	// probe; benchmarks run one at a time, so the global logger is theirs.
	SetClientLogger(slog.New(slog.DiscardHandler))
	srv := testredis.Start(b)
	s, err := Open(srv.URL(), Options{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { s.Close() })
	return s, srv
}

// BenchmarkIncr is one session at a time counting a connection: one
// EVALSHA round trip on loopback.
func BenchmarkIncr(b *testing.B) {
	s, _ := benchStore(b)
	ctx := context.Background()
	k := store.Key("192.0.2.1", "rate", "conn")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := s.Incr(ctx, k, 1, time.Minute); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkIncrParallel is many sessions from different clients at once,
// sharing the connection pool.
func BenchmarkIncrParallel(b *testing.B) {
	s, _ := benchStore(b)
	ctx := context.Background()
	var next atomic.Int64
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		k := store.Key("198.51.100."+strconv.FormatInt(next.Add(1), 10), "rate", "conn")
		for pb.Next() {
			if _, err := s.Incr(ctx, k, 1, time.Minute); err != nil {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkIncrRedisDown is BenchmarkIncr with redis-server killed and the
// breaker open: what each hook costs while Redis is down.
func BenchmarkIncrRedisDown(b *testing.B) {
	s, srv := benchStore(b)
	ctx := context.Background()
	k := store.Key("192.0.2.1", "rate", "conn")
	srv.Kill()
	for {
		if _, err := s.Incr(ctx, k, 1, time.Minute); errors.Is(err, errOpen) {
			break
		}
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, err := s.Incr(ctx, k, 1, time.Minute); !errors.Is(err, store.ErrUnavailable) {
			b.Fatal(err)
		}
	}
}

// BenchmarkIncrParallelRedisDown is BenchmarkIncrParallel while Redis is
// down.
func BenchmarkIncrParallelRedisDown(b *testing.B) {
	s, srv := benchStore(b)
	ctx := context.Background()
	srv.Kill()
	for {
		if _, err := s.Incr(ctx, "k", 1, time.Minute); errors.Is(err, errOpen) {
			break
		}
	}
	var next atomic.Int64
	b.ReportAllocs()
	b.RunParallel(func(pb *testing.PB) {
		k := store.Key("198.51.100."+strconv.FormatInt(next.Add(1), 10), "rate", "conn")
		for pb.Next() {
			if _, err := s.Incr(ctx, k, 1, time.Minute); !errors.Is(err, store.ErrUnavailable) {
				b.Error(err)
				return
			}
		}
	})
}

// BenchmarkTally and BenchmarkAcquire are the heavier scripts.
func BenchmarkTally(b *testing.B) {
	s, _ := benchStore(b)
	ctx := context.Background()
	k := store.Key("192.0.2.1", "offenders", "deny")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := s.Tally(ctx, k, time.Now(), time.Hour, time.Hour); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkAcquireRelease(b *testing.B) {
	s, _ := benchStore(b)
	ctx := context.Background()
	k := store.Key("192.0.2.1", "hosts_allow", "slots")
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := s.Acquire(ctx, k, "host:1", 10, time.Now(), time.Minute); err != nil {
			b.Fatal(err)
		}
		if err := s.Release(ctx, k, "host:1"); err != nil {
			b.Fatal(err)
		}
	}
}
