package rules

import (
	"net/netip"
	"testing"
	"time"
)

func TestOverlapWindowAcrossGenerations(t *testing.T) {
	var found int
	var warned []netip.Addr
	o := &Overlap{Found: func() { found++ }, Warn: func(a netip.Addr, _ int) { warned = append(warned, a) }}
	a, b, c := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("192.0.2.2"), netip.MustParseAddr("192.0.2.3")
	t0 := time.Unix(1_800_000_000, 0)
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	steps := []struct {
		protocol string
		client   netip.Addr
		at       time.Duration
		found    int // total after the step
	}{
		{"milter", a, 0, 0},
		{"milter", a, time.Second, 0}, // the same front-end again
		{"milter", b, 20 * time.Second, 0},
		{"policy", c, 31 * time.Second, 0},  // rotates: a and b now in the older generation
		{"policy", b, 35 * time.Second, 1},  // 15 s after its milter start: one session, twice
		{"policy", a, 35 * time.Second, 1},  // 34 s after: another session on a reused port
		{"milter", c, 40 * time.Second, 2},  // either order
		{"policy", b, 100 * time.Second, 2}, // two rotations later: forgotten
	}
	for i, st := range steps {
		o.saw(st.protocol, st.client, 25, at(st.at))
		if found != st.found {
			t.Fatalf("step %d (%s %s at %v): found %d, want %d", i, st.protocol, st.client, st.at, found, st.found)
		}
	}
	if len(warned) != 1 || warned[0] != b {
		t.Fatalf("warned for %v, want once for %v", warned, b)
	}
}

func TestOverlapGenerationIsBounded(t *testing.T) {
	found := 0
	o := &Overlap{Found: func() { found++ }}
	now := time.Unix(1_800_000_000, 0)
	addr := func(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)}) }
	for i := range overlapMax + 1 {
		o.saw("milter", addr(i), 25, now)
	}
	if len(o.cur) != overlapMax {
		t.Fatalf("generation holds %d sessions, want at most %d", len(o.cur), overlapMax)
	}
	o.saw("policy", addr(overlapMax), 25, now)
	o.saw("policy", addr(1), 25, now)
	if found != 1 {
		t.Fatalf("found %d: the session over the bound goes unwatched, the others are watched", found)
	}
}
