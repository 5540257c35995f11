package store

import (
	"net/netip"
	"testing"
)

// The keys of a session start: client_stats' four, built and parsed
// back as the embedded store does.
func BenchmarkClientStatsKeys(b *testing.B) {
	k := NewKeys("client_stats", 64)
	a := netip.MustParseAddr("10.1.2.3")
	var segs [MaxSegs]Seg
	b.ReportAllocs()
	for b.Loop() {
		for _, bits := range []int{32, 24, 16, 8} {
			n := netip.PrefixFrom(a, bits).Masked()
			key := k.Net(netip.PrefixFrom(a, 8).Masked(), n)
			if _, ok := ParseKeyInto(key, &segs); !ok {
				b.Fatal(key)
			}
		}
	}
}
