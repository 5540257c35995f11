package spamthrottle

import (
	"testing"
	"time"
)

func TestLaw(t *testing.T) {
	p := params{st: 100 * time.Millisecond, stmax: time.Second, rcpt: 2}
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	at := func(msec int) time.Time { return t0.Add(time.Duration(msec) * time.Millisecond) }
	rec := func(pace, free int) record {
		return record{pace: time.Duration(pace) * time.Millisecond, free: at(free)}
	}
	for _, tc := range []struct {
		name     string
		prev     record
		found    bool
		now, n   int
		wantPace int
		wantHold int
	}{
		{"first message", record{}, false, 0, 1, 100, 100},
		{"back right after the hold: doubles", rec(100, 1000), true, 1000, 1, 200, 200},
		{"during the hold (another session): doubles", rec(400, 1000), true, 500, 1, 800, 800},
		{"doubling stops at stmax", rec(800, 1000), true, 1000, 1, 1000, 1000},
		{"one gap just under the pace: still faster", rec(400, 1000), true, 1399, 1, 800, 800},
		{"a gap of one pace: halves", rec(400, 1000), true, 1400, 1, 200, 200},
		{"two paces: quartered", rec(400, 1000), true, 1800, 1, 100, 100},
		{"never below st", rec(400, 1000), true, 5000, 1, 100, 100},
		{"a very long silence", rec(1000, 0), true, 1 << 30, 1, 100, 100},
		{"a record below st (settings changed) starts at st", rec(10, 1000), true, 1000, 1, 200, 200},
		{"a record above stmax is capped", rec(5000, 1000), true, 1000, 1, 1000, 1000},
		{"recipients beyond rcpt add st each", record{}, false, 0, 5, 100, 400},
		{"the recipient term is capped at stmax", rec(400, 0), true, 0, 30, 800, 1000},
		{"within rcpt: nothing added", record{}, false, 0, 2, 100, 100},
	} {
		r, hold := next(tc.prev, tc.found, at(tc.now), p, tc.n)
		if r.pace != time.Duration(tc.wantPace)*time.Millisecond || hold != time.Duration(tc.wantHold)*time.Millisecond {
			t.Errorf("%s: pace %v hold %v, want %dms %dms", tc.name, r.pace, hold, tc.wantPace, tc.wantHold)
		}
		if !r.free.Equal(at(tc.now).Add(hold)) {
			t.Errorf("%s: free %v, want now+hold", tc.name, r.free)
		}
	}
	if r, hold := next(rec(800, 0), true, at(0), params{stmax: time.Second}, 50); hold != 0 || r.pace != 0 {
		t.Errorf("st 0: pace %v hold %v, want nothing", r.pace, hold)
	}
}

func TestRecordTTLCoversTheDecay(t *testing.T) {
	p := params{st: 100 * time.Millisecond, stmax: 100 * time.Second}
	now := time.Unix(1e9, 0)
	for _, pace := range []time.Duration{100 * time.Millisecond, 150 * time.Millisecond, time.Second, 100 * time.Second} {
		r := record{pace: pace, free: now.Add(pace)}
		expiry := now.Add(r.ttl(now, p))
		// Whoever comes back just before the record expires must get what
		// a new client gets (st), or the expiry would change the law.
		late := expiry.Add(-time.Millisecond)
		if r2, _ := next(r, true, late, p, 1); r2.pace != p.st {
			t.Errorf("pace %v: at expiry-1ms the law gives %v, want st", pace, r2.pace)
		}
		// And a client faster than its pace always finds its record.
		if !expiry.After(r.free.Add(pace)) {
			t.Errorf("pace %v: record expires at %v, before free+pace %v", pace, expiry, r.free.Add(pace))
		}
	}
}

func TestRecordEncoding(t *testing.T) {
	r := record{pace: 1500 * time.Millisecond, free: time.UnixMilli(1790000000123)}
	got, ok := decode(r.encode())
	if !ok || got.pace != r.pace || !got.free.Equal(r.free) {
		t.Fatalf("round trip: %+v %v", got, ok)
	}
	for _, bad := range []string{"", "12", "x:1", "1:y", "-5:1"} {
		if _, ok := decode([]byte(bad)); ok {
			t.Errorf("decode(%q) accepted", bad)
		}
	}
}
