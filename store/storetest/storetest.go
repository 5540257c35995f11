// Package storetest is the behaviour every store.Store backend must share,
// written once so the embedded and Redis backends cannot drift apart: a rule
// tested against one must mean the same thing against the other.
//
// A backend's test calls Run with a Harness. The suite only uses keys built
// with store.Key under a per-run random client name, and deletes them when
// each subtest ends, so it may run against a shared Redis database.
package storetest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"math"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/store"
)

// Harness adapts one backend to the suite.
type Harness struct {
	// New returns a store for one subtest. The suite closes it when the
	// subtest ends, after deleting the keys it wrote.
	New func(t *testing.T) store.Store
	// Advance moves the backend's notion of time forward by d: a fake clock
	// for the memory backend, a real sleep for Redis. To keep real sleeping
	// cheap the suite uses TTLs of at most 1500ms and advances at most 2s in
	// any subtest. Subtests run one after another, so a harness may share a
	// single clock between all the stores New returns.
	Advance func(t *testing.T, d time.Duration)
}

// TTLs and steps are chosen so every "still there" and "gone" check is at
// least 200ms from an expiry edge: a real Redis has millisecond expiry and
// network latency, and a slow CI machine must not flip a result.
const (
	shortTTL = 500 * time.Millisecond
	longTTL  = 1500 * time.Millisecond
	pastTTL  = 700 * time.Millisecond // Advance by this to expire shortTTL
)

// Run runs the contract suite as subtests of t.
func Run(t *testing.T, h Harness) {
	t.Helper()
	if h.New == nil || h.Advance == nil {
		t.Fatal("storetest: Harness.New and Harness.Advance are required")
	}
	var b [8]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails
	r := &runner{h: h, id: hex.EncodeToString(b[:])}

	for _, tc := range []struct {
		name string
		fn   func(t *testing.T, r *runner)
	}{
		{"Incr/CreatesAtDeltaAndReturnsNewValue", testIncrSequences},
		{"Incr/FixedWindow", testIncrFixedWindow},
		{"Incr/NoTTL", testIncrNoTTL},
		{"Incr/NonInteger", testIncrNonInteger},
		{"Incr/Overflow", testIncrOverflow},
		{"Incr/GetReturnsDecimal", testIncrGetDecimal},
		{"Incr/AfterSetDecimal", testIncrAfterSetDecimal},
		{"Get/Missing", testGetMissing},
		{"Set/RoundTrip", testSetRoundTrip},
		{"Set/Replaces", testSetReplaces},
		{"Set/Expires", testSetExpires},
		{"Delete", testDelete},
		{"KeysIndependent", testKeysIndependent},
		{"NoAliasing", testNoAliasing},
		{"ContextDone", testContextDone},
		{"Concurrent/IncrSameKey", testConcurrentIncrSameKey},
		{"Concurrent/ManyKeys", testConcurrentManyKeys},
	} {
		t.Run(tc.name, func(t *testing.T) { tc.fn(t, r) })
	}
	for _, tc := range opTests {
		t.Run(tc.name, func(t *testing.T) { tc.fn(t, r) })
	}
}

// runner hands out the per-subtest environments of one Run call.
type runner struct {
	h  Harness
	id string

	mu sync.Mutex
	n  int
}

// env is one leaf subtest's store plus helpers that fail the test on
// unexpected errors, so the test bodies read as the behaviour they check.
type env struct {
	t      *testing.T
	h      Harness
	s      store.Store
	ctx    context.Context
	client string

	mu   sync.Mutex
	keys []string
}

// env opens a fresh store for t. Each leaf subtest calls it, so the
// "advance at most 2s" budget is per leaf.
func (r *runner) env(t *testing.T) *env {
	t.Helper()
	r.mu.Lock()
	r.n++
	n := r.n
	r.mu.Unlock()

	s := r.h.New(t)
	if s == nil {
		t.Fatal("Harness.New returned nil")
	}
	e := &env{
		t:      t,
		h:      r.h,
		s:      s,
		ctx:    t.Context(),
		client: fmt.Sprintf("storetest-%s-%d", r.id, n),
	}
	// Cleanups run last-registered first: delete the keys, then close.
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	t.Cleanup(func() {
		// t.Context is already cancelled when cleanups run.
		ctx := context.Background()
		e.mu.Lock()
		defer e.mu.Unlock()
		for _, k := range e.keys {
			if err := s.Delete(ctx, k); err != nil {
				t.Errorf("cleanup Delete(%q): %v", k, err)
			}
		}
	})
	return e
}

// key returns a key unique to this subtest and run.
func (e *env) key(what string) string {
	return e.keyFor("", "storetest", what)
}

// keyFor varies every part of store.Key while keeping the client (the hash
// tag) unique to this subtest and run.
func (e *env) keyFor(clientSuffix, rule, what string) string {
	k := store.Key(e.client+clientSuffix, rule, what)
	e.mu.Lock()
	e.keys = append(e.keys, k)
	e.mu.Unlock()
	return k
}

func (e *env) incr(key string, delta int64, ttl time.Duration) int64 {
	e.t.Helper()
	n, err := e.s.Incr(e.ctx, key, delta, ttl)
	if err != nil {
		e.t.Fatalf("Incr(%q, %d, %v): %v", key, delta, ttl, err)
	}
	return n
}

func (e *env) wantIncr(key string, delta int64, ttl time.Duration, want int64) {
	e.t.Helper()
	if got := e.incr(key, delta, ttl); got != want {
		e.t.Fatalf("Incr(%q, %d, %v) = %d, want %d", key, delta, ttl, got, want)
	}
}

func (e *env) set(key string, v []byte, ttl time.Duration) {
	e.t.Helper()
	if err := e.s.Set(e.ctx, key, v, ttl); err != nil {
		e.t.Fatalf("Set(%q, %q, %v): %v", key, v, ttl, err)
	}
}

func (e *env) get(key string) ([]byte, bool) {
	e.t.Helper()
	v, ok, err := e.s.Get(e.ctx, key)
	if err != nil {
		e.t.Fatalf("Get(%q): %v", key, err)
	}
	return v, ok
}

func (e *env) wantGet(key string, want []byte) {
	e.t.Helper()
	v, ok := e.get(key)
	if !ok {
		e.t.Fatalf("Get(%q): missing, want %q", key, want)
	}
	if !bytes.Equal(v, want) {
		e.t.Fatalf("Get(%q) = %q, want %q", key, v, want)
	}
}

func (e *env) wantMissing(key string) {
	e.t.Helper()
	if v, ok := e.get(key); ok {
		e.t.Fatalf("Get(%q) = %q, want missing", key, v)
	}
}

func (e *env) del(key string) {
	e.t.Helper()
	if err := e.s.Delete(e.ctx, key); err != nil {
		e.t.Fatalf("Delete(%q): %v", key, err)
	}
}

func (e *env) advance(d time.Duration) {
	e.t.Helper()
	e.h.Advance(e.t, d)
}

func testIncrSequences(t *testing.T, r *runner) {
	for _, tc := range []struct {
		name   string
		deltas []int64
		want   []int64
	}{
		{"ones", []int64{1, 1, 1}, []int64{1, 2, 3}},
		{"larger deltas", []int64{5, 10, 100}, []int64{5, 15, 115}},
		{"negative", []int64{-1, -1}, []int64{-1, -2}},
		{"mixed signs", []int64{10, -3, -7, -1}, []int64{10, 7, 0, -1}},
		{"zero creates", []int64{0, 0, 2}, []int64{0, 0, 2}},
		{"max", []int64{math.MaxInt64, -1}, []int64{math.MaxInt64, math.MaxInt64 - 1}},
		{"min", []int64{math.MinInt64, 1}, []int64{math.MinInt64, math.MinInt64 + 1}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := r.env(t)
			k := e.key("c")
			for i, d := range tc.deltas {
				e.wantIncr(k, d, longTTL, tc.want[i])
			}
		})
	}
}

func testIncrFixedWindow(t *testing.T, r *runner) {
	t.Run("later ttl does not extend", func(t *testing.T) {
		e := r.env(t)
		k := e.key("c")
		e.wantIncr(k, 1, shortTTL, 1)
		e.advance(300 * time.Millisecond)
		// Had this extended the window, the key would live until 1800ms.
		e.wantIncr(k, 1, longTTL, 2)
		e.advance(400 * time.Millisecond) // 700ms: first window is over
		e.wantIncr(k, 1, shortTTL, 1)
		e.advance(pastTTL) // the restarted window has its own ttl
		e.wantIncr(k, 1, shortTTL, 1)
	})
	t.Run("no expiry is kept", func(t *testing.T) {
		e := r.env(t)
		k := e.key("c")
		e.wantIncr(k, 1, 0, 1)
		e.wantIncr(k, 1, shortTTL, 2)
		e.advance(pastTTL)
		e.wantIncr(k, 1, shortTTL, 3)
	})
	t.Run("set without ttl is kept", func(t *testing.T) {
		e := r.env(t)
		k := e.key("c")
		e.set(k, []byte("7"), 0)
		e.wantIncr(k, 1, shortTTL, 8)
		e.advance(pastTTL)
		e.wantGet(k, []byte("8"))
	})
	t.Run("set ttl is kept", func(t *testing.T) {
		e := r.env(t)
		k := e.key("c")
		e.set(k, []byte("7"), shortTTL)
		e.wantIncr(k, 1, longTTL, 8)
		e.advance(pastTTL)
		e.wantMissing(k)
	})
}

func testIncrNoTTL(t *testing.T, r *runner) {
	for _, ttl := range []time.Duration{0, -time.Millisecond, -time.Hour} {
		t.Run(ttl.String(), func(t *testing.T) {
			e := r.env(t)
			k := e.key("c")
			e.wantIncr(k, 1, ttl, 1)
			e.advance(2 * time.Second)
			e.wantIncr(k, 1, ttl, 2)
		})
	}
}

func testIncrNonInteger(t *testing.T, r *runner) {
	// Only values every Redis-compatible server rejects; the memory backend
	// tests Redis's stricter edge cases ("+1", "007") itself.
	for _, v := range []string{
		"abc", "", "1.5", "12abc", "0x10", "1e3",
		"9223372036854775808", "-9223372036854775809",
		"\x00",
	} {
		t.Run(strconv.Quote(v), func(t *testing.T) {
			e := r.env(t)
			k := e.key("v")
			e.set(k, []byte(v), 0)
			_, err := e.s.Incr(e.ctx, k, 1, 0)
			if err == nil {
				t.Fatalf("Incr on %q succeeded, want error", v)
			}
			// An operator reading the log needs to know which key is bad.
			if !strings.Contains(err.Error(), k) {
				t.Errorf("Incr error %q does not name key %q", err, k)
			}
			e.wantGet(k, []byte(v))
		})
	}
}

func testIncrOverflow(t *testing.T, r *runner) {
	for _, tc := range []struct {
		name  string
		start int64
		delta int64
	}{
		{"up", math.MaxInt64, 1},
		{"down", math.MinInt64, -1},
		{"large delta", 1, math.MaxInt64},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := r.env(t)
			k := e.key("c")
			e.wantIncr(k, tc.start, 0, tc.start)
			if n, err := e.s.Incr(e.ctx, k, tc.delta, 0); err == nil {
				t.Fatalf("Incr(%d) on %d = %d, want overflow error", tc.delta, tc.start, n)
			}
			e.wantGet(k, []byte(strconv.FormatInt(tc.start, 10)))
		})
	}
}

func testIncrGetDecimal(t *testing.T, r *runner) {
	for _, tc := range []struct {
		name   string
		deltas []int64
		want   string
	}{
		{"three", []int64{1, 1, 1}, "3"},
		{"negative", []int64{-5}, "-5"},
		{"zero", []int64{4, -4}, "0"},
		{"max", []int64{math.MaxInt64}, "9223372036854775807"},
		{"min", []int64{math.MinInt64}, "-9223372036854775808"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := r.env(t)
			k := e.key("c")
			for _, d := range tc.deltas {
				e.incr(k, d, longTTL)
			}
			e.wantGet(k, []byte(tc.want))
		})
	}
}

func testIncrAfterSetDecimal(t *testing.T, r *runner) {
	for _, tc := range []struct {
		set   string
		delta int64
		want  int64
	}{
		{"7", 1, 8},
		{"-3", 10, 7},
		{"0", -1, -1},
		{"9223372036854775806", 1, math.MaxInt64},
		{"-9223372036854775808", 1, math.MinInt64 + 1},
	} {
		t.Run(tc.set, func(t *testing.T) {
			e := r.env(t)
			k := e.key("c")
			e.set(k, []byte(tc.set), 0)
			e.wantIncr(k, tc.delta, 0, tc.want)
			e.wantGet(k, []byte(strconv.FormatInt(tc.want, 10)))
		})
	}
}

func testGetMissing(t *testing.T, r *runner) {
	e := r.env(t)
	e.wantMissing(e.key("never"))
	// A neighbour existing must not make a prefix or extension visible.
	e.set(e.key("ab"), []byte("x"), 0)
	e.wantMissing(e.key("a"))
	e.wantMissing(e.key("abc"))
}

func testSetRoundTrip(t *testing.T, r *runner) {
	big := make([]byte, 64<<10)
	for i := range big {
		big[i] = byte(i * 7)
	}
	for _, tc := range []struct {
		name string
		v    []byte
		ttl  time.Duration
	}{
		{"text", []byte("hello"), 0},
		{"with ttl", []byte("hello"), longTTL},
		{"binary with NUL", []byte{0, 1, 0xff, 0, 'a', 0x80, 0}, 0},
		{"only NUL", []byte{0}, 0},
		{"empty", []byte{}, 0},
		{"utf8", []byte("grüße ✉"), 0},
		{"decimal looking", []byte("007"), 0},
		{"64KiB", big, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := r.env(t)
			k := e.key("v")
			e.set(k, tc.v, tc.ttl)
			e.wantGet(k, tc.v)
		})
	}
}

func testSetReplaces(t *testing.T, r *runner) {
	t.Run("value", func(t *testing.T) {
		e := r.env(t)
		k := e.key("v")
		e.set(k, []byte("first"), 0)
		e.set(k, []byte("2nd"), 0)
		e.wantGet(k, []byte("2nd"))
	})
	t.Run("ttl removed", func(t *testing.T) {
		e := r.env(t)
		k := e.key("v")
		e.set(k, []byte("a"), shortTTL)
		e.set(k, []byte("b"), 0)
		e.advance(pastTTL)
		e.wantGet(k, []byte("b"))
	})
	t.Run("ttl added", func(t *testing.T) {
		e := r.env(t)
		k := e.key("v")
		e.set(k, []byte("a"), 0)
		e.set(k, []byte("b"), shortTTL)
		e.advance(pastTTL)
		e.wantMissing(k)
	})
	t.Run("ttl shortened", func(t *testing.T) {
		e := r.env(t)
		k := e.key("v")
		e.set(k, []byte("a"), longTTL)
		e.set(k, []byte("b"), shortTTL)
		e.advance(pastTTL)
		e.wantMissing(k)
	})
	t.Run("counter", func(t *testing.T) {
		e := r.env(t)
		k := e.key("c")
		e.wantIncr(k, 5, shortTTL, 5)
		e.set(k, []byte("x"), 0)
		e.advance(pastTTL) // the counter's ttl went with it
		e.wantGet(k, []byte("x"))
	})
}

func testSetExpires(t *testing.T, r *runner) {
	e := r.env(t)
	k := e.key("v")
	e.set(k, []byte("abc"), shortTTL)
	e.wantGet(k, []byte("abc"))
	e.advance(300 * time.Millisecond)
	e.wantGet(k, []byte("abc"))
	e.advance(400 * time.Millisecond)
	e.wantMissing(k)
	// The expired non-integer must not linger and break a new counter.
	e.wantIncr(k, 1, 0, 1)
}

func testDelete(t *testing.T, r *runner) {
	t.Run("value", func(t *testing.T) {
		e := r.env(t)
		k := e.key("v")
		e.set(k, []byte("x"), 0)
		e.del(k)
		e.wantMissing(k)
	})
	t.Run("counter restarts", func(t *testing.T) {
		e := r.env(t)
		k := e.key("c")
		e.wantIncr(k, 3, 0, 3)
		e.del(k)
		e.wantMissing(k)
		e.wantIncr(k, 1, 0, 1)
	})
	t.Run("missing", func(t *testing.T) {
		e := r.env(t)
		e.del(e.key("never"))
	})
	t.Run("twice", func(t *testing.T) {
		e := r.env(t)
		k := e.key("v")
		e.set(k, []byte("x"), 0)
		e.del(k)
		e.del(k)
	})
	t.Run("expired", func(t *testing.T) {
		e := r.env(t)
		k := e.key("v")
		e.set(k, []byte("x"), shortTTL)
		e.advance(pastTTL)
		e.del(k)
		e.wantMissing(k)
	})
}

func testKeysIndependent(t *testing.T, r *runner) {
	e := r.env(t)
	// Neighbours differ in one part only: the suffix, the rule, or the
	// client inside the hash tag.
	keys := []string{
		e.keyFor("", "r", "a"),
		e.keyFor("", "r", "ab"),
		e.keyFor("", "r", "a:b"),
		e.keyFor("", "r", "b"),
		e.keyFor("", "r2", "a"),
		e.keyFor("x", "r", "a"),
		e.keyFor(":r", "a", ""),
		e.keyFor("-192.0.2.1", "r", "a"),
		e.keyFor("-2001:db8::1", "r", "a"),
	}
	seen := make(map[string]bool)
	for _, k := range keys {
		if seen[k] {
			t.Fatalf("test bug: duplicate key %q", k)
		}
		seen[k] = true
	}
	for i, k := range keys {
		e.wantIncr(k, int64(i+1), 0, int64(i+1))
	}
	for i, k := range keys {
		e.wantGet(k, []byte(strconv.Itoa(i+1)))
	}
	e.del(keys[0])
	e.wantMissing(keys[0])
	for i, k := range keys[1:] {
		e.wantGet(k, []byte(strconv.Itoa(i+2)))
	}
}

func testNoAliasing(t *testing.T, r *runner) {
	t.Run("set input", func(t *testing.T) {
		e := r.env(t)
		k := e.key("v")
		in := []byte("original")
		e.set(k, in, 0)
		copy(in, "XXXXXXXX")
		e.wantGet(k, []byte("original"))
	})
	t.Run("get result", func(t *testing.T) {
		e := r.env(t)
		k := e.key("v")
		e.set(k, []byte("original"), 0)
		v, _ := e.get(k)
		copy(v, "XXXXXXXX")
		// Appending within spare capacity must not reach stored bytes either.
		_ = append(v[:1], "YYYYYYYYYYYYYYYY"...)
		e.wantGet(k, []byte("original"))
	})
	t.Run("counter get result", func(t *testing.T) {
		e := r.env(t)
		k := e.key("c")
		e.wantIncr(k, 3, 0, 3)
		v, _ := e.get(k)
		v[0] = '9'
		_ = append(v[:0], "12345"...)
		e.wantGet(k, []byte("3"))
		e.wantIncr(k, 1, 0, 4)
	})
}

func testContextDone(t *testing.T, r *runner) {
	e := r.env(t)
	k := e.key("v")
	ctx, cancel := context.WithCancel(e.ctx)
	cancel()
	for _, op := range []struct {
		name string
		call func() error
	}{
		{"Incr", func() error { _, err := e.s.Incr(ctx, k, 1, 0); return err }},
		{"Get", func() error { _, _, err := e.s.Get(ctx, k); return err }},
		{"Set", func() error { return e.s.Set(ctx, k, []byte("x"), 0) }},
		{"Delete", func() error { return e.s.Delete(ctx, k) }},
	} {
		if err := op.call(); !errors.Is(err, context.Canceled) {
			t.Errorf("%s with cancelled context: err = %v, want context.Canceled", op.name, err)
		}
	}
	// None of the cancelled calls may have written.
	e.wantMissing(k)
}

func testConcurrentIncrSameKey(t *testing.T, r *runner) {
	const goroutines, perG = 16, 500
	e := r.env(t)
	k := e.key("c")

	results := make([][]int64, goroutines)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			<-start // release together so the first Incr is contended too
			got := make([]int64, 0, perG)
			for range perG {
				n, err := e.s.Incr(e.ctx, k, 1, 0)
				if err != nil {
					t.Errorf("Incr: %v", err)
					return
				}
				got = append(got, n)
			}
			results[g] = got
		})
	}
	close(start)
	wg.Wait()
	if t.Failed() {
		return
	}
	// Atomicity means every increment saw a distinct value, not just that
	// the total adds up.
	seen := make([]bool, goroutines*perG+1)
	for _, got := range results {
		for _, n := range got {
			if n < 1 || n > goroutines*perG || seen[n] {
				t.Fatalf("Incr returned %d twice or out of range", n)
			}
			seen[n] = true
		}
	}
	e.wantGet(k, []byte(strconv.Itoa(goroutines*perG)))
}

func testConcurrentManyKeys(t *testing.T, r *runner) {
	const goroutines, nkeys, rounds = 16, 64, 4
	e := r.env(t)
	keys := make([]string, nkeys)
	for i := range keys {
		keys[i] = e.key("c" + strconv.Itoa(i))
	}
	own := make([]string, goroutines)
	for g := range own {
		own[g] = e.key("own" + strconv.Itoa(g))
	}

	start := make(chan struct{})
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Go(func() {
			<-start
			val := []byte("goroutine-" + strconv.Itoa(g))
			for round := range rounds {
				// Each goroutine starts at a different key so shards see
				// mixed traffic rather than a convoy.
				for i := range nkeys {
					k := keys[(i+g*7+round)%nkeys]
					if _, err := e.s.Incr(e.ctx, k, 1, 0); err != nil {
						t.Errorf("Incr(%q): %v", k, err)
						return
					}
				}
				// Interleave the other operations on a key of its own.
				if err := e.s.Set(e.ctx, own[g], val, longTTL); err != nil {
					t.Errorf("Set: %v", err)
					return
				}
				v, ok, err := e.s.Get(e.ctx, own[g])
				if err != nil || !ok || !bytes.Equal(v, val) {
					t.Errorf("Get(%q) = %q, %v, %v; want %q", own[g], v, ok, err, val)
					return
				}
				if err := e.s.Delete(e.ctx, own[g]); err != nil {
					t.Errorf("Delete: %v", err)
					return
				}
			}
		})
	}
	close(start)
	wg.Wait()
	if t.Failed() {
		return
	}
	want := []byte(strconv.Itoa(goroutines * rounds))
	for _, k := range keys {
		e.wantGet(k, want)
	}
	for _, k := range own {
		e.wantMissing(k)
	}
}
