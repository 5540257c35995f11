package main

import (
	"net/netip"
	"testing"
)

func TestClientPool(t *testing.T) {
	const n = 200000
	p, err := newClientPool(n, 0.25)
	if err != nil {
		t.Fatal(err)
	}
	seen := make(map[netip.Addr]bool, n)
	nets := map[netip.Prefix]bool{}
	v6 := 0
	for i := range n {
		c := p.get(i)
		if seen[c.addr] {
			t.Fatalf("client %d: %v given twice", i, c.addr)
		}
		seen[c.addr] = true
		if c.addr.Is6() {
			v6++
			pfx, _ := c.addr.Prefix(32)
			if pfx != netip.MustParsePrefix("2001:db8::/32") {
				t.Fatalf("IPv6 client %v outside the documentation prefix", c.addr)
			}
			continue
		}
		if o := c.addr.As4()[0]; o < 20 || o > 119 {
			t.Fatalf("IPv4 client %v outside 20/8-119/8", c.addr)
		}
		pfx, _ := c.addr.Prefix(16)
		nets[pfx] = true
	}
	if v6 != n/4 {
		t.Errorf("%d IPv6 clients, want %d", v6, n/4)
	}
	// Scattered: far more /16s than consecutive numbering would give.
	if len(nets) < 5000 {
		t.Errorf("IPv4 clients in only %d /16 networks", len(nets))
	}
	again, _ := newClientPool(n, 0.25)
	if p.get(n-7) != again.get(n-7) {
		t.Error("the same client differs between pools")
	}
}

func TestClientPoolLast(t *testing.T) {
	p, err := newClientPool(maxClients, 0)
	if err != nil {
		t.Fatal(err)
	}
	if p.get(maxClients-1).addr == p.get(maxClients-101).addr {
		t.Error("the last clients collide")
	}
}

func TestClientPoolErrors(t *testing.T) {
	for _, tc := range []struct {
		n    int
		ipv6 float64
	}{{0, 0}, {maxClients + 1, 0}, {10, -0.1}, {10, 1.5}} {
		if _, err := newClientPool(tc.n, tc.ipv6); err == nil {
			t.Errorf("newClientPool(%d, %v) accepted", tc.n, tc.ipv6)
		}
	}
}
