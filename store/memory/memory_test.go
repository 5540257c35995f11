package memory

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/store"
	"github.com/policyd-mail/policyd/store/storetest"
)

// fakeClock lets expiry be tested without waiting; it is locked because the
// background sweeper reads it from its own goroutine.
type fakeClock struct {
	mu  sync.Mutex
	now time.Time
}

func newFakeClock() *fakeClock {
	return &fakeClock{now: time.Date(2024, 5, 1, 12, 0, 0, 0, time.UTC)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
}

func TestContract(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts Options
	}{
		{"defaults", Options{SweepInterval: -1}},
		// One shard funnels every key through one map and lock; a 1ms
		// sweeper races with the suite's operations under -race.
		{"one shard busy sweeper", Options{Shards: 1, SweepInterval: time.Millisecond}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := newFakeClock()
			opts := tc.opts
			opts.Now = clock.Now
			storetest.Run(t, storetest.Harness{
				New:     func(*testing.T) store.Store { return New(opts) },
				Advance: func(_ *testing.T, d time.Duration) { clock.Advance(d) },
			})
		})
	}
}

func TestShardsRoundedToPowerOfTwo(t *testing.T) {
	for _, tc := range []struct{ in, want int }{
		{0, 64}, {-3, 64}, {1, 1}, {2, 2}, {3, 4}, {64, 64}, {100, 128},
	} {
		t.Run(strconv.Itoa(tc.in), func(t *testing.T) {
			s := New(Options{Shards: tc.in, SweepInterval: -1})
			defer s.Close()
			if got := len(s.shards); got != tc.want {
				t.Errorf("shards = %d, want %d", got, tc.want)
			}
			if s.mask != uint64(tc.want-1) {
				t.Errorf("mask = %d, want %d", s.mask, tc.want-1)
			}
		})
	}
}

// fill stores n keys expiring after ttl and returns them.
func fill(t *testing.T, s *Store, prefix string, n int, ttl time.Duration) []string {
	t.Helper()
	keys := make([]string, n)
	for i := range keys {
		keys[i] = store.Key(prefix, "r", strconv.Itoa(i))
		if err := s.Set(t.Context(), keys[i], []byte("v"), ttl); err != nil {
			t.Fatal(err)
		}
	}
	return keys
}

func TestSweepReclaimsExpired(t *testing.T) {
	clock := newFakeClock()
	s := New(Options{Now: clock.Now, SweepInterval: -1})
	defer s.Close()
	expiring := fill(t, s, "expiring", 100, time.Second)
	fill(t, s, "lasting", 10, 0)
	fill(t, s, "later", 5, time.Minute)
	if got := s.Len(); got != 115 {
		t.Fatalf("Len = %d, want 115", got)
	}

	clock.Advance(2 * time.Second)
	// Expired entries are invisible before they are reclaimed...
	if _, ok, _ := s.Get(t.Context(), expiring[1]); ok {
		t.Fatal("expired key visible before Sweep")
	}
	// ...and Get reclaims the one it looked at.
	if got := s.Len(); got != 114 {
		t.Fatalf("Len before Sweep = %d, want 114", got)
	}
	s.Sweep()
	if got := s.Len(); got != 15 {
		t.Fatalf("Len after Sweep = %d, want 15", got)
	}
}

func TestSweepShrinksEmptiedShard(t *testing.T) {
	clock := newFakeClock()
	s := New(Options{Shards: 1, Now: clock.Now, SweepInterval: -1})
	defer s.Close()
	fill(t, s, "burst", 20_000, time.Second)
	keep := fill(t, s, "keep", 3, 0)
	sh := &s.shards[0]
	sh.mu.Lock()
	slots, top := len(sh.t.slots), sh.t.top
	sh.mu.Unlock()
	clock.Advance(2 * time.Second)
	s.Sweep()
	sh.mu.Lock()
	slotsAfter, topAfter, dead := len(sh.t.slots), sh.t.top, sh.t.dead
	sh.mu.Unlock()
	if slotsAfter != minSlots {
		t.Errorf("index after sweep: %d slots (%d before), want %d", slotsAfter, slots, minSlots)
	}
	if topAfter >= top/100 || dead != 0 {
		t.Errorf("arena after sweep: %d bytes written, %d dead (%d written before), want the 3 live records only", topAfter, dead, top)
	}
	if got := s.Len(); got != 3 {
		t.Errorf("Len = %d, want 3", got)
	}
	for _, k := range keep {
		if v, ok, err := s.Get(t.Context(), k); err != nil || !ok || string(v) != "v" {
			t.Errorf("Get(%s) after the shrink = %q, %v, %v", k, v, ok, err)
		}
	}
}

func TestBackgroundSweeper(t *testing.T) {
	clock := newFakeClock()
	s := New(Options{Now: clock.Now, SweepInterval: time.Millisecond})
	defer s.Close()
	fill(t, s, "expiring", 200, time.Second)
	fill(t, s, "lasting", 7, 0)
	clock.Advance(2 * time.Second)

	// Poll: the sweeper runs on a real ticker, so all we can do is wait for
	// its effect, with a deadline so a broken sweeper fails instead of hangs.
	deadline := time.Now().Add(10 * time.Second)
	for s.Len() != 7 {
		if time.Now().After(deadline) {
			t.Fatalf("Len = %d after 10s, want 7: sweeper did not reclaim", s.Len())
		}
		time.Sleep(time.Millisecond)
	}
}

func TestCloseStopsSweeperAndIsIdempotent(t *testing.T) {
	s := New(Options{SweepInterval: time.Millisecond})
	fill(t, s, "k", 1000, time.Nanosecond) // keep the sweeper busy
	done := s.done

	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			if err := s.Close(); err != nil {
				t.Errorf("Close: %v", err)
			}
			// Close waits for the sweeper, so by now it must have exited,
			// whichever caller got to do the work.
			select {
			case <-done:
			default:
				t.Error("Close returned while the sweeper was still running")
			}
		})
	}
	wg.Wait()
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
	if got := s.Len(); got != 0 {
		t.Errorf("Len after Close = %d, want 0", got)
	}
	s.Sweep() // must not panic on a closed store
}

func TestCloseWithoutSweeper(t *testing.T) {
	s := New(Options{SweepInterval: -1})
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
}

func TestOperationsAfterClose(t *testing.T) {
	s := New(Options{SweepInterval: -1})
	ctx := t.Context()
	k := store.Key("c", "r", "x")
	if err := s.Set(ctx, k, []byte("1"), 0); err != nil {
		t.Fatal(err)
	}
	s.Close()
	for _, op := range []struct {
		name string
		call func() error
	}{
		{"Incr", func() error { _, err := s.Incr(ctx, k, 1, 0); return err }},
		{"Get", func() error { _, _, err := s.Get(ctx, k); return err }},
		{"Set", func() error { return s.Set(ctx, k, []byte("x"), 0) }},
		{"Delete", func() error { return s.Delete(ctx, k) }},
	} {
		t.Run(op.name, func(t *testing.T) {
			err := op.call()
			if !errors.Is(err, store.ErrUnavailable) {
				t.Fatalf("err = %v, want store.ErrUnavailable", err)
			}
			if !strings.Contains(err.Error(), k) {
				t.Errorf("err %q does not name key %q", err, k)
			}
		})
	}
}

func TestIncrErrorsWrapped(t *testing.T) {
	s := New(Options{SweepInterval: -1})
	defer s.Close()
	ctx := t.Context()
	k := store.Key("c", "r", "x")

	if err := s.Set(ctx, k, []byte("abc"), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Incr(ctx, k, 1, 0); !errors.Is(err, ErrNotInteger) {
		t.Errorf("Incr on text: err = %v, want ErrNotInteger", err)
	}
	if err := s.Set(ctx, k, []byte("9223372036854775807"), 0); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Incr(ctx, k, 1, 0); !errors.Is(err, ErrOverflow) {
		t.Errorf("Incr past max: err = %v, want ErrOverflow", err)
	}
}

// TestParseIntMatchesRedis pins the edge cases where Redis is stricter than
// strconv.ParseInt; the contract suite avoids them because Redis-compatible
// servers differ there.
func TestParseIntMatchesRedis(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"0", 0, true},
		{"1", 1, true},
		{"-1", -1, true},
		{"10", 10, true},
		{"9223372036854775807", 9223372036854775807, true},
		{"-9223372036854775808", -9223372036854775808, true},
		{"9223372036854775808", 0, false},
		{"-9223372036854775809", 0, false},
		{"18446744073709551616", 0, false},
		{"99999999999999999999", 0, false},
		{"", 0, false},
		{"-", 0, false},
		{"-0", 0, false},
		{"00", 0, false},
		{"007", 0, false},
		{"+1", 0, false},
		{" 1", 0, false},
		{"1 ", 0, false},
		{"1\x00", 0, false},
		{"1.0", 0, false},
		{"--1", 0, false},
	} {
		t.Run(strconv.Quote(tc.in), func(t *testing.T) {
			got, ok := parseInt([]byte(tc.in))
			if got != tc.want || ok != tc.ok {
				t.Errorf("parseInt(%q) = %d, %v; want %d, %v", tc.in, got, ok, tc.want, tc.ok)
			}
		})
	}
}

func TestIncrExistingKeyDoesNotAllocate(t *testing.T) {
	s := New(Options{SweepInterval: -1})
	defer s.Close()
	ctx := context.Background()
	k := store.Key("192.0.2.1", "rate", "conn")
	if _, err := s.Incr(ctx, k, 1, time.Minute); err != nil {
		t.Fatal(err)
	}
	allocs := testing.AllocsPerRun(1000, func() {
		if _, err := s.Incr(ctx, k, 1, time.Minute); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Errorf("Incr on an existing key: %v allocs/op, want 0", allocs)
	}
}

func TestHugeTTLDoesNotExpire(t *testing.T) {
	s := New(Options{SweepInterval: -1})
	defer s.Close()
	ctx := t.Context()
	k := store.Key("c", "r", "x")
	// now+ttl overflows int64; it must saturate, not wrap into the past.
	if _, err := s.Incr(ctx, k, 1, time.Duration(1<<63-1)); err != nil {
		t.Fatal(err)
	}
	if n, err := s.Incr(ctx, k, 1, 0); err != nil || n != 2 {
		t.Fatalf("Incr = %d, %v; want 2", n, err)
	}
}

// An admin scan gives the shard's lock back every scanSlice records, and
// still finds every record that lives through it exactly once, whatever
// the mail path writes, rewrites (to a larger value, which moves the
// record) and deletes between two holds.
func TestScanReleasesShardLock(t *testing.T) {
	ctx := context.Background()
	s := New(Options{Shards: 1, SweepInterval: -1})
	defer s.Close()
	const n = 5000
	key := func(i int) string { return fmt.Sprintf("policyd:{192.0.2.%d}:r%05d", i%250, i) }
	for i := range n {
		if err := s.Set(ctx, key(i), []byte("v"), 0); err != nil {
			t.Fatal(err)
		}
	}
	pauses := 0
	scanPause = func(int) {
		// Taking the lock here would deadlock were it still held.
		pauses++
		for j := range 200 {
			i := (pauses*200 + j) % n
			if i%10 == 0 {
				continue // the keys that must be found: never touched
			}
			switch j % 3 {
			case 0:
				s.Set(ctx, key(i), bytes.Repeat([]byte("x"), 40+pauses), 0)
			case 1:
				s.Delete(ctx, key(i))
			default:
				s.Set(ctx, fmt.Sprintf("policyd:{192.0.2.1}:new%d-%d", pauses, j), []byte("v"), 0)
			}
		}
	}
	defer func() { scanPause = nil }()
	keys, err := s.Scan(ctx, "policyd:")
	if err != nil {
		t.Fatal(err)
	}
	if pauses < n/scanSlice {
		t.Fatalf("the scan let go of the shard %d times for %d records", pauses, n)
	}
	seen := map[string]int{}
	for _, k := range keys {
		seen[k]++
		if seen[k] > 1 {
			t.Fatalf("%s twice", k)
		}
	}
	for i := 0; i < n; i += 10 {
		if seen[key(i)] != 1 {
			t.Fatalf("%s, untouched during the scan, was not found", key(i))
		}
	}
	// Everything found is there now or was deleted during the scan.
	for _, k := range keys {
		if _, ok, _ := s.Get(ctx, k); !ok && !strings.Contains(k, ":r") {
			t.Fatalf("%s found but never written", k)
		}
	}
}
