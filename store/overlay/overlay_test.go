package overlay

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/store"
	"github.com/policyd-mail/policyd/store/memory"
	"github.com/policyd-mail/policyd/store/storetest"
)

// The overlay keeps the whole store contract (here over an empty base).
func TestContract(t *testing.T) {
	var mu sync.Mutex
	now := time.Unix(1_800_000_000, 0)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	storetest.Run(t, storetest.Harness{
		New: func(t *testing.T) store.Store {
			return New(memory.New(memory.Options{SweepInterval: -1, Now: clock}), clock)
		},
		Advance: func(_ *testing.T, d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() },
	})
}

// Reads see the base; writes change only the overlay, each key starting
// from what the base holds.
func TestBaseUntouched(t *testing.T) {
	ctx := context.Background()
	base := memory.New(memory.Options{SweepInterval: -1})
	defer base.Close()
	counter := store.Key("192.0.2.1", "connection_shaper", "sessions")
	stats := store.Key("192.0.0.0/8", "client_stats", "@192.0.2.0/24")
	lease := store.Key("192.0.2.1", "hosts_allow", "sessions")
	base.Incr(ctx, counter, 5, time.Hour)
	base.HIncr(ctx, time.Hour, store.FieldIncr{Key: stats, Field: "permfail", Delta: 2})
	base.Acquire(ctx, lease, "s1", 10, time.Now(), time.Hour)

	o := &Store{base: base, mem: memory.New(memory.Options{SweepInterval: -1}), now: time.Now, own: map[string]bool{}}
	defer o.mem.Close()
	if v, _ := o.Incr(ctx, counter, 1, time.Hour); v != 6 {
		t.Errorf("overlay counter = %d, want 6 (5 from the base + 1)", v)
	}
	o.HIncr(ctx, time.Hour, store.FieldIncr{Key: stats, Field: "permfail", Delta: 1})
	if recs, _ := o.HGet(ctx, stats); recs[0]["permfail"] != 3 {
		t.Errorf("overlay record = %v, want permfail 3", recs[0])
	}
	if _, held, _ := o.Acquire(ctx, lease, "s2", 10, time.Now(), time.Hour); held != 2 {
		t.Errorf("overlay leases held = %d, want 2", held)
	}
	o.Delete(ctx, counter)
	if keys, _ := o.Scan(ctx, store.Prefix); len(keys) != 2 {
		t.Errorf("overlay scan = %v, want the deleted counter gone", keys)
	}
	// The base is as it was.
	if v, _, _ := base.Get(ctx, counter); string(v) != "5" {
		t.Errorf("base counter = %q, want 5", v)
	}
	if recs, _ := base.HGet(ctx, stats); recs[0]["permfail"] != 2 {
		t.Errorf("base record = %v, want permfail 2", recs[0])
	}
	if e, _, _ := base.Inspect(ctx, lease); len(e.Fields) != 1 {
		t.Errorf("base leases = %v, want s1 only", e.Fields)
	}
}
