package memory

import (
	"context"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/store"
)

// BenchmarkIncrSameKey is one client hammering one counter: the lock and map
// cost with no contention from other keys.
func BenchmarkIncrSameKey(b *testing.B) {
	s := New(Options{SweepInterval: -1})
	defer s.Close()
	ctx := context.Background()
	k := store.Key("192.0.2.1", "rate", "conn")
	b.ReportAllocs()
	for b.Loop() {
		if _, err := s.Incr(ctx, k, 1, time.Minute); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkIncrParallelDistinctKeys is many sessions from different clients
// at once; it shows whether sharding keeps them off each other's locks.
func BenchmarkIncrParallelDistinctKeys(b *testing.B) {
	s := New(Options{SweepInterval: -1})
	defer s.Close()
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

// BenchmarkGet reads a typical small record; the one allocation is the copy
// handed to the caller.
func BenchmarkGet(b *testing.B) {
	s := New(Options{SweepInterval: -1})
	defer s.Close()
	ctx := context.Background()
	k := store.Key("192.0.2.1", "greylist", "triplet")
	if err := s.Set(ctx, k, []byte("1714564800"), time.Hour); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if _, ok, err := s.Get(ctx, k); err != nil || !ok {
			b.Fatal(ok, err)
		}
	}
}
