package store

import (
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"
)

// The fast IPv4 path answers only where the general one agrees.
func checkNetSeg(t *testing.T, s string) {
	t.Helper()
	slow, okSlow := parseNetSegSlow(s)
	fast, okFast := parseV4Net(s)
	if okFast && (!okSlow || slow.Net != fast) {
		t.Fatalf("%q: fast path %v, general %v (%v)", s, fast, slow.Net, okSlow)
	}
	got, ok := parseNetSeg(s)
	if ok != okSlow || got.Net != slow.Net {
		t.Fatalf("%q: parseNetSeg %v %v, general %v %v", s, got.Net, ok, slow.Net, okSlow)
	}
}

func TestParseV4NetAgrees(t *testing.T) {
	for _, s := range []string{
		"0.0.0.0", "10.1.2.3", "255.255.255.255", "256.1.1.1", "1.2.3", "1.2.3.4.5", "01.2.3.4",
		"1.2.3.04", "1.2.3.4/0", "1.2.3.4/32", "1.2.3.4/33", "1.2.3.4/08", "1.2.3.4/", "10.0.0.0/8",
		"1.2.3.4x", "1.2.3.4/8x", "1..2.3", ".1.2.3", "1.2.3.4/1000", "1000.2.3.4", "", "::1",
		"2001:db8::/64", "::ffff:1.2.3.4", "1.2.3.4%eth0", "1.2.3.-4", "+1.2.3.4", "1.2.3.4/+8",
	} {
		checkNetSeg(t, s)
	}
	r := rand.New(rand.NewPCG(1, 2))
	const alphabet = "0123456789./:x"
	for range 200000 {
		var b strings.Builder
		for range 1 + r.IntN(18) {
			b.WriteByte(alphabet[r.IntN(len(alphabet))])
		}
		checkNetSeg(t, b.String())
	}
}

func FuzzParseNetSeg(f *testing.F) {
	for _, s := range []string{"10.1.2.3", "10.0.0.0/8", "01.2.3.4", "1.2.3.4/33", "2001:db8::/64"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) { checkNetSeg(t, s) })
}

// A prefix no rule passes is written as before, never dropped: a key
// about an invalid network must not become another key.
func TestKeysWriteInvalidPrefixes(t *testing.T) {
	k := NewKeys("client_stats", 64)
	tag := netip.MustParsePrefix("10.0.0.0/8")
	if got, want := k.Net(tag, netip.Prefix{}), "policyd:{10.0.0.0/8}:client_stats:@invalid Prefix"; got != want {
		t.Errorf("Net with an invalid network = %q, want %q", got, want)
	}
	if got, want := k.Under(netip.Prefix{}, "x"), "policyd:{invalid Prefix}:client_stats:x"; got != want {
		t.Errorf("Under an invalid tag = %q, want %q", got, want)
	}
	if got, want := k.Net(tag, netip.MustParsePrefix("10.1.2.0/24")), "policyd:{10.0.0.0/8}:client_stats:@10.1.2.0/24"; got != want {
		t.Errorf("Net = %q, want %q", got, want)
	}
}
