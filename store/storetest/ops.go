package storetest

import (
	"bytes"
	"errors"
	"maps"
	"math"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/store"
)

// The operations rules build on beyond counters: SetNX (greylisting),
// hashes (client statistics), tallies (repeat offenders), leases
// (concurrency slots), and the admin API's Scan and Inspect.

// opTests are run by Run after the basic ones.
var opTests = []struct {
	name string
	fn   func(t *testing.T, r *runner)
}{
	{"SetNX", testSetNX},
	{"Delete/Many", testDeleteMany},
	{"Hash/IncrAndGet", testHash},
	{"Hash/TTLRefreshed", testHashTTL},
	{"Hash/CrossSlot", testCrossSlot},
	{"WrongType", testWrongType},
	{"Tally", testTally},
	{"Tally/Expires", testTallyExpires},
	{"Limit", testLimit},
	{"Limit/Expires", testLimitExpires},
	{"Limit/WorstCase", testLimitWorstCase},
	{"Concurrent/Limit", testConcurrentLimit},
	{"Leases", testLeases},
	{"Leases/Expire", testLeasesExpire},
	{"Concurrent/Leases", testConcurrentLeases},
	{"Concurrent/HIncr", testConcurrentHIncr},
	{"Scan", testScan},
	{"Inspect", testInspect},
	{"FindAndForgetClient", testFindClient},
}

// t0 is the "now" the suite passes to Tally and Acquire; it only has to be
// consistent within a subtest.
var t0 = time.Unix(1_790_000_000, 0)

func testSetNX(t *testing.T, r *runner) {
	e := r.env(t)
	k := e.key("g")
	stored, cur, err := e.s.SetNX(e.ctx, k, []byte("first"), shortTTL)
	if err != nil || !stored || cur != nil {
		t.Fatalf("SetNX on a new key = %v, %q, %v; want stored", stored, cur, err)
	}
	stored, cur, err = e.s.SetNX(e.ctx, k, []byte("second"), longTTL)
	if err != nil || stored || !bytes.Equal(cur, []byte("first")) {
		t.Fatalf("SetNX on an existing key = %v, %q, %v; want not stored, current \"first\"", stored, cur, err)
	}
	e.advance(pastTTL) // the first ttl holds: the second call changed nothing
	stored, _, err = e.s.SetNX(e.ctx, k, []byte("third"), shortTTL)
	if err != nil || !stored {
		t.Fatalf("SetNX after expiry = %v, %v; want stored", stored, err)
	}
	e.wantGet(k, []byte("third"))
	c := e.key("counter")
	e.wantIncr(c, 7, longTTL, 7)
	if stored, cur, err := e.s.SetNX(e.ctx, c, []byte("x"), 0); err != nil || stored || string(cur) != "7" {
		t.Fatalf("SetNX on a counter = %v, %q, %v; want its decimal", stored, cur, err)
	}
}

func testDeleteMany(t *testing.T, r *runner) {
	e := r.env(t)
	a, b, c := e.key("a"), e.key("b"), e.key("c")
	e.set(a, []byte("1"), 0)
	e.wantIncr(b, 1, 0, 1)
	if err := e.s.HIncr(e.ctx, 0, store.FieldIncr{Key: c, Field: "f", Delta: 1}); err != nil {
		t.Fatal(err)
	}
	if err := e.s.Delete(e.ctx, a, b, c, e.key("missing")); err != nil {
		t.Fatalf("Delete of several keys: %v", err)
	}
	e.wantMissing(a)
	e.wantMissing(b)
	if got := e.hget(c); got[0] != nil {
		t.Fatalf("hash survived Delete: %v", got)
	}
}

func (e *env) hget(keys ...string) []map[string]int64 {
	e.t.Helper()
	out, err := e.s.HGet(e.ctx, keys...)
	if err != nil {
		e.t.Fatalf("HGet(%v): %v", keys, err)
	}
	if len(out) != len(keys) {
		e.t.Fatalf("HGet(%v) returned %d maps", keys, len(out))
	}
	return out
}

func (e *env) hincr(ttl time.Duration, incs ...store.FieldIncr) {
	e.t.Helper()
	if err := e.s.HIncr(e.ctx, ttl, incs...); err != nil {
		e.t.Fatalf("HIncr(%v): %v", incs, err)
	}
}

func testHash(t *testing.T, r *runner) {
	e := r.env(t)
	k32, k24, k8 := e.key("net/32"), e.key("net/24"), e.key("net/8")
	missing := e.key("net/16")
	e.hincr(longTTL,
		store.FieldIncr{Key: k32, Field: "s", Delta: 1},
		store.FieldIncr{Key: k24, Field: "s", Delta: 1},
		store.FieldIncr{Key: k8, Field: "s", Delta: 1},
	)
	e.hincr(longTTL,
		store.FieldIncr{Key: k32, Field: "p", Delta: 2},
		store.FieldIncr{Key: k32, Field: "s", Delta: 4},
		store.FieldIncr{Key: k8, Field: "p", Delta: -1},
	)
	// A key new to the store, twice in one call: both count.
	fresh := e.key("net/16b")
	e.hincr(longTTL,
		store.FieldIncr{Key: k24, Field: "s", Delta: 0},
		store.FieldIncr{Key: fresh, Field: "s", Delta: 1},
		store.FieldIncr{Key: fresh, Field: "s", Delta: 2},
		store.FieldIncr{Key: fresh, Field: "t", Delta: 3},
	)
	if got := e.hget(fresh); !maps.Equal(got[0], map[string]int64{"s": 3, "t": 3}) {
		t.Fatalf("HGet = %v, want s=3 t=3", got)
	}
	got := e.hget(k32, missing, k24, k8)
	want := []map[string]int64{{"s": 5, "p": 2}, nil, {"s": 1}, {"s": 1, "p": -1}}
	for i := range want {
		if !maps.Equal(got[i], want[i]) || (want[i] == nil) != (got[i] == nil) {
			t.Fatalf("HGet = %v, want %v", got, want)
		}
	}
	// The returned maps are the caller's own.
	got[0]["s"] = 100
	if again := e.hget(k32); again[0]["s"] != 5 {
		t.Fatalf("HGet result aliases the store: %v", again)
	}
}

func testHashTTL(t *testing.T, r *runner) {
	e := r.env(t)
	k := e.key("h")
	e.hincr(shortTTL, store.FieldIncr{Key: k, Field: "s", Delta: 1})
	e.advance(300 * time.Millisecond)
	// Every write gives the record its ttl again: it lives on past the
	// first write's expiry.
	e.hincr(shortTTL, store.FieldIncr{Key: k, Field: "s", Delta: 1})
	e.advance(400 * time.Millisecond)
	if got := e.hget(k); got[0]["s"] != 2 {
		t.Fatalf("refreshed hash = %v, want s=2", got)
	}
	e.advance(pastTTL)
	if got := e.hget(k); got[0] != nil {
		t.Fatalf("hash outlived its ttl: %v", got)
	}
}

func testCrossSlot(t *testing.T, r *runner) {
	e := r.env(t)
	a := e.keyFor("-a", "storetest", "h")
	b := e.keyFor("-b", "storetest", "h")
	err := e.s.HIncr(e.ctx, 0, store.FieldIncr{Key: a, Field: "f", Delta: 1}, store.FieldIncr{Key: b, Field: "f", Delta: 1})
	if !errors.Is(err, store.ErrCrossSlot) {
		t.Fatalf("HIncr across hash tags: %v, want ErrCrossSlot", err)
	}
	if _, err := e.s.HGet(e.ctx, a, b); !errors.Is(err, store.ErrCrossSlot) {
		t.Fatalf("HGet across hash tags: %v, want ErrCrossSlot", err)
	}
}

func testWrongType(t *testing.T, r *runner) {
	e := r.env(t)
	str, hash, leases := e.key("s"), e.key("h"), e.key("l")
	e.set(str, []byte("v"), 0)
	e.hincr(0, store.FieldIncr{Key: hash, Field: "f", Delta: 1})
	if ok, _, err := e.s.Acquire(e.ctx, leases, "m", 1, t0, time.Minute); err != nil || !ok {
		t.Fatalf("Acquire: %v %v", ok, err)
	}
	checks := []struct {
		name string
		err  error
	}{}
	add := func(name string, err error) {
		checks = append(checks, struct {
			name string
			err  error
		}{name, err})
	}
	_, err := e.s.Incr(e.ctx, hash, 1, 0)
	add("Incr on a hash", err)
	_, _, err = e.s.Get(e.ctx, hash)
	add("Get on a hash", err)
	add("HIncr on a string", e.s.HIncr(e.ctx, 0, store.FieldIncr{Key: str, Field: "f", Delta: 1}))
	_, err = e.s.HGet(e.ctx, str)
	add("HGet on a string", err)
	_, err = e.s.Tally(e.ctx, leases, t0, time.Hour, time.Hour)
	add("Tally on leases", err)
	_, _, err = e.s.Acquire(e.ctx, hash, "m", 1, t0, time.Minute)
	add("Acquire on a hash", err)
	_, _, err = e.s.Limit(e.ctx, str, t0, store.Rate{Field: "messages", Limit: 1, Period: time.Hour, Cost: 1})
	add("Limit on a string", err)
	for _, c := range checks {
		if !errors.Is(c.err, store.ErrWrongType) {
			t.Errorf("%s: %v, want ErrWrongType", c.name, c.err)
		}
	}
	// A refused HIncr changes none of its keys.
	other := e.key("h2")
	err = e.s.HIncr(e.ctx, 0, store.FieldIncr{Key: other, Field: "f", Delta: 1}, store.FieldIncr{Key: str, Field: "f", Delta: 1})
	if !errors.Is(err, store.ErrWrongType) {
		t.Fatalf("mixed HIncr: %v", err)
	}
	if got := e.hget(other); got[0] != nil {
		t.Fatalf("a failed HIncr wrote %v", got)
	}
}

func testTally(t *testing.T, r *runner) {
	e := r.env(t)
	k := e.key("offender")
	quiet := 8 * time.Hour
	steps := []struct {
		at   time.Duration
		want int64
	}{
		{0, 1}, {time.Hour, 2}, {3 * time.Hour, 3}, // within 8h of each other
		{3*time.Hour + quiet + time.Minute, 1}, // 8h quiet: starts over
		{12 * time.Hour, 2},
	}
	for _, st := range steps {
		n, err := e.s.Tally(e.ctx, k, t0.Add(st.at), quiet, longTTL)
		if err != nil || n != st.want {
			t.Fatalf("Tally at +%v = %d, %v; want %d", st.at, n, err, st.want)
		}
	}
	got := e.hget(k)[0]
	if got[store.TallyCount] != 2 || got[store.TallyLast] != t0.Add(12*time.Hour).UnixMilli() {
		t.Fatalf("tally record = %v", got)
	}
}

// limitStep is one Limit call of a contract test: costs of the messages
// and recipients budgets, and what the call must answer.
type limitStep struct {
	at         time.Duration
	msgs, rcpt int64
	ok         bool
	used       [2]int64
}

func runLimit(t *testing.T, e *env, k string, steps []limitStep) {
	t.Helper()
	for i, st := range steps {
		ok, used, err := e.s.Limit(e.ctx, k, t0.Add(st.at),
			store.Rate{Field: "messages", Limit: 3, Period: time.Hour, Cost: st.msgs},
			store.Rate{Field: "recipients", Limit: 5, Period: time.Hour, Cost: st.rcpt})
		if err != nil || ok != st.ok || len(used) != 2 || used[0] != st.used[0] || used[1] != st.used[1] {
			t.Fatalf("step %d: Limit at +%v cost %d,%d = %v %v %v; want %v %v", i+1, st.at, st.msgs, st.rcpt, ok, used, err, st.ok, st.used)
		}
	}
}

// Limit is GCRA over several budgets of one key: all take the cost or
// none does, and each refills at its own rate.
func testLimit(t *testing.T, r *runner) {
	e := r.env(t)
	k := e.key("rate")
	runLimit(t, e, k, []limitStep{
		{0, 1, 2, true, [2]int64{1, 2}},
		{0, 1, 2, true, [2]int64{2, 4}},
		{0, 1, 2, false, [2]int64{3, 6}}, // recipients would be 6 of 5: nothing taken
		{0, 1, 1, true, [2]int64{3, 5}},
		{0, 1, 0, false, [2]int64{4, 5}}, // messages full
		{0, 0, 0, true, [2]int64{3, 5}},  // a read
		// 20 minutes refill a message (3/h) and 1.67 recipients (5/h);
		// a started unit counts whole
		{20 * time.Minute, 1, 1, true, [2]int64{3, 5}},
		{20 * time.Minute, 0, 1, false, [2]int64{3, 6}},
		{24 * time.Minute, 0, 1, true, [2]int64{3, 5}},
		// an hour after the last take, everything is whole
		{84 * time.Minute, 3, 5, true, [2]int64{3, 5}},
	})
	// A cost above the whole budget (a SIZE= of 2^63) is refused and
	// changes nothing, without overflowing on either backend.
	ok, used, err := e.s.Limit(e.ctx, k, t0.Add(84*time.Minute), store.Rate{Field: "messages", Limit: 3, Period: time.Hour, Cost: math.MaxInt64})
	if err != nil || ok || len(used) != 1 || used[0] != math.MaxInt64 {
		t.Fatalf("Limit with a huge cost = %v %v %v; want refused, used MaxInt64", ok, used, err)
	}
	got := e.hget(k)[0]
	if want := t0.Add(84*time.Minute + time.Hour).UnixMicro(); got["messages"] != want || got["recipients"] != want {
		t.Fatalf("budget record = %v; want both at %d", got, want)
	}
}

// The record lives until its fullest budget is whole again.
func testLimitExpires(t *testing.T, r *runner) {
	e := r.env(t)
	k := e.key("rate")
	rate := store.Rate{Field: "messages", Limit: 2, Period: shortTTL, Cost: 2}
	if ok, _, err := e.s.Limit(e.ctx, k, t0, rate); err != nil || !ok {
		t.Fatalf("Limit = %v %v", ok, err)
	}
	if ok, _, err := e.s.Limit(e.ctx, k, t0, rate); err != nil || ok {
		t.Fatalf("Limit on a full budget = %v %v; want refused", ok, err)
	}
	e.advance(pastTTL)
	if got := e.hget(k); got[0] != nil {
		t.Fatalf("the budget outlived its period: %v", got)
	}
}

// The worst-placed window: a burst of Limit at once, then one every
// Period/Limit; over any span of one Period at most 2·Limit−1 pass, and
// the steady rate is Limit per Period.
func testLimitWorstCase(t *testing.T, r *runner) {
	e := r.env(t)
	k := e.key("rate")
	const n = 10
	period := time.Hour
	var passed []time.Duration
	// Try every minute for three hours, ten times each minute.
	for m := time.Duration(0); m < 3*period; m += time.Minute {
		for range 10 {
			ok, _, err := e.s.Limit(e.ctx, k, t0.Add(m), store.Rate{Field: "messages", Limit: n, Period: period, Cost: 1})
			if err != nil {
				t.Fatal(err)
			}
			if ok {
				passed = append(passed, m)
			}
		}
	}
	most := 0
	for i, start := range passed {
		j := i
		for j < len(passed) && passed[j] < start+period {
			j++
		}
		most = max(most, j-i)
	}
	if most != 2*n-1 {
		t.Fatalf("the worst window of one period passed %d, want 2·%d−1", most, n)
	}
	// After the burst, one per Period/Limit (6 minutes): the tries from
	// minute 0 to 179 pass n at once and then one at 6, 12, … 174.
	if want := n + int((3*period-time.Minute)/(period/n)); len(passed) != want {
		t.Fatalf("%d passed in three periods, want %d", len(passed), want)
	}
}

// Concurrent takes from one budget never exceed it.
func testConcurrentLimit(t *testing.T, r *runner) {
	e := r.env(t)
	k := e.key("rate")
	var wg sync.WaitGroup
	var mu sync.Mutex
	granted := 0
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 10 {
				ok, _, err := e.s.Limit(e.ctx, k, t0, store.Rate{Field: "messages", Limit: 25, Period: time.Hour, Cost: 1})
				if err != nil {
					t.Error(err)
					return
				}
				if ok {
					mu.Lock()
					granted++
					mu.Unlock()
				}
			}
		}()
	}
	wg.Wait()
	if granted != 25 {
		t.Fatalf("%d granted of a budget of 25", granted)
	}
}

func testTallyExpires(t *testing.T, r *runner) {
	e := r.env(t)
	k := e.key("offender")
	for i := range 3 {
		if _, err := e.s.Tally(e.ctx, k, t0.Add(time.Duration(i)*time.Second), time.Hour, shortTTL); err != nil {
			t.Fatal(err)
		}
	}
	e.advance(pastTTL)
	if got := e.hget(k); got[0] != nil {
		t.Fatalf("tally outlived its ttl: %v", got)
	}
	if n, err := e.s.Tally(e.ctx, k, t0.Add(5*time.Second), time.Hour, shortTTL); err != nil || n != 1 {
		t.Fatalf("Tally after expiry = %d, %v; want 1", n, err)
	}
}

func (e *env) acquire(key, member string, limit int64, at time.Duration, lease time.Duration) (bool, int64) {
	e.t.Helper()
	ok, held, err := e.s.Acquire(e.ctx, key, member, limit, t0.Add(at), lease)
	if err != nil {
		e.t.Fatalf("Acquire(%s): %v", member, err)
	}
	return ok, held
}

func testLeases(t *testing.T, r *runner) {
	e := r.env(t)
	k := e.key("slots")
	steps := []struct {
		member  string
		granted bool
		held    int64
	}{
		{"a", true, 1}, {"b", true, 2}, {"c", false, 2},
		{"a", true, 2}, // renewing one's own lease at the limit is allowed
	}
	for _, st := range steps {
		if ok, held := e.acquire(k, st.member, 2, 0, time.Minute); ok != st.granted || held != st.held {
			t.Fatalf("Acquire(%s) = %v, %d; want %v, %d", st.member, ok, held, st.granted, st.held)
		}
	}
	if err := e.s.Release(e.ctx, k, "b"); err != nil {
		t.Fatal(err)
	}
	if err := e.s.Release(e.ctx, k, "nobody"); err != nil {
		t.Fatalf("releasing a missing lease: %v", err)
	}
	if ok, held := e.acquire(k, "c", 2, 0, time.Minute); !ok || held != 2 {
		t.Fatalf("Acquire after Release = %v, %d", ok, held)
	}
	if err := e.s.Release(e.ctx, e.key("none"), "x"); err != nil {
		t.Fatalf("Release on a missing key: %v", err)
	}
}

func testLeasesExpire(t *testing.T, r *runner) {
	e := r.env(t)
	k := e.key("slots")
	e.acquire(k, "crashed", 1, 0, time.Minute)
	if ok, _ := e.acquire(k, "next", 1, 30*time.Second, time.Minute); ok {
		t.Fatal("granted while the first lease runs")
	}
	// A holder that never releases frees its slot when its lease runs out.
	if ok, held := e.acquire(k, "next", 1, 61*time.Second, time.Minute); !ok || held != 1 {
		t.Fatalf("Acquire after the lease ran out = %v, %d", ok, held)
	}
	// And the set itself goes away with its last lease (backend time).
	k2 := e.key("short")
	e.acquire(k2, "m", 1, 0, shortTTL)
	e.advance(pastTTL)
	if _, ok, err := e.s.Inspect(e.ctx, k2); err != nil || ok {
		t.Fatalf("lease set outlived its lease: %v %v", ok, err)
	}
}

func testConcurrentLeases(t *testing.T, r *runner) {
	e := r.env(t)
	k := e.key("slots")
	const workers, limit = 16, 5
	var wg sync.WaitGroup
	var mu sync.Mutex
	granted := 0
	for i := range workers {
		wg.Go(func() {
			ok, _, err := e.s.Acquire(e.ctx, k, string(rune('a'+i)), limit, t0, time.Minute)
			if err != nil {
				t.Error(err)
			}
			if ok {
				mu.Lock()
				granted++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if granted != limit {
		t.Fatalf("%d leases granted concurrently, limit %d", granted, limit)
	}
}

func testConcurrentHIncr(t *testing.T, r *runner) {
	e := r.env(t)
	a, b := e.key("a"), e.key("b")
	var wg sync.WaitGroup
	for range 16 {
		wg.Go(func() {
			for range 100 {
				if err := e.s.HIncr(e.ctx, longTTL, store.FieldIncr{Key: a, Field: "s", Delta: 1}, store.FieldIncr{Key: b, Field: "s", Delta: 2}); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if got := e.hget(a, b); got[0]["s"] != 1600 || got[1]["s"] != 3200 {
		t.Fatalf("after concurrent HIncr: %v", got)
	}
}

func testScan(t *testing.T, r *runner) {
	e := r.env(t)
	want := []string{e.key("a"), e.key("b"), e.key("c")}
	e.set(want[0], []byte("1"), 0)
	e.wantIncr(want[1], 1, longTTL, 1)
	e.hincr(0, store.FieldIncr{Key: want[2], Field: "f", Delta: 1})
	gone := e.key("d")
	e.set(gone, []byte("x"), shortTTL)
	e.advance(pastTTL)
	got, err := e.s.Scan(e.ctx, store.ClientPrefix(e.client))
	if err != nil {
		t.Fatal(err)
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("Scan = %v, want %v", got, want)
	}
}

func testInspect(t *testing.T, r *runner) {
	e := r.env(t)
	s, c, h, l := e.key("s"), e.key("c"), e.key("h"), e.key("l")
	e.set(s, []byte("v"), 0)
	e.wantIncr(c, 3, longTTL, 3)
	e.hincr(longTTL, store.FieldIncr{Key: h, Field: "f", Delta: 2})
	e.acquire(l, "m", 1, 0, time.Minute)
	checks := []struct {
		key    string
		kind   store.Kind
		value  string
		fields map[string]int64
		ttl    bool
	}{
		{s, store.KindString, "v", nil, false},
		{c, store.KindString, "3", nil, true},
		{h, store.KindHash, "", map[string]int64{"f": 2}, true},
		{l, store.KindLeases, "", map[string]int64{"m": t0.Add(time.Minute).UnixMilli()}, true},
	}
	for _, ck := range checks {
		got, ok, err := e.s.Inspect(e.ctx, ck.key)
		if err != nil || !ok {
			t.Fatalf("Inspect(%s): %v %v", ck.key, ok, err)
		}
		if got.Key != ck.key || got.Kind != ck.kind || string(got.Value) != ck.value || !maps.Equal(got.Fields, ck.fields) || (got.TTL > 0) != ck.ttl {
			t.Errorf("Inspect(%s) = %+v", ck.key, got)
		}
	}
	if _, ok, err := e.s.Inspect(e.ctx, e.key("missing")); ok || err != nil {
		t.Fatalf("Inspect of a missing key: %v %v", ok, err)
	}
}
