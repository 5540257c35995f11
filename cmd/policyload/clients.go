package main

import (
	"fmt"
	"math"
	"net/netip"
)

// client is one simulated SMTP client.
type client struct {
	addr netip.Addr
	name string // reverse DNS name; "unknown" when it has none, as Postfix says
	helo string
}

// clientPool hands out N distinct clients, a share of them IPv6. The
// addresses are synthetic (they only travel inside requests, never on
// the wire) and spread over many networks so that per-network records
// (client_stats' /8 to /24) do not all land on one key.
type clientPool struct {
	n  int
	v6 int // clients [0, v6) are IPv6
}

func newClientPool(n int, ipv6 float64) (clientPool, error) {
	if n < 1 {
		return clientPool{}, fmt.Errorf("clients: %d, want at least 1", n)
	}
	if n > maxClients {
		return clientPool{}, fmt.Errorf("clients: %d, at most %d distinct addresses", n, maxClients)
	}
	if ipv6 < 0 || ipv6 > 1 || math.IsNaN(ipv6) {
		return clientPool{}, fmt.Errorf("ipv6: %v, want a fraction between 0 and 1", ipv6)
	}
	return clientPool{n: n, v6: int(math.Round(ipv6 * float64(n)))}, nil
}

// maxClients is what the IPv4 layout below keeps distinct: 100 first
// octets times 2^24.
const maxClients = 100 << 24

// get returns client i (0 <= i < n); the same i always gives the same client.
func (p clientPool) get(i int) client {
	var a netip.Addr
	if i < p.v6 {
		a = v6Addr(i)
	} else {
		a = v4Addr(i)
	}
	c := client{addr: a, helo: fmt.Sprintf("mx%d.client%d.example.net", i%3, i)}
	// One client in ten has no reverse name, as on the Internet.
	if i%10 == 9 {
		c.name = "unknown"
	} else {
		c.name = fmt.Sprintf("mail%d.client%d.example.net", i%3, i)
	}
	return c
}

// v4Addr puts client i in one of 100 first octets (20-119: clear of 0/8,
// 10/8 and 127/8, which the bench's whitelist holds) and scatters the
// rest with a bijection, so distinct i give distinct addresses.
func v4Addr(i int) netip.Addr {
	rest := mix24(uint32(i / 100))
	return netip.AddrFrom4([4]byte{byte(20 + i%100), byte(rest >> 16), byte(rest >> 8), byte(rest)})
}

// v6Addr gives client i a /64 of its own in the documentation prefix
// 2001:db8::/32, which the rules key IPv6 clients by.
func v6Addr(i int) netip.Addr {
	n := mix32(uint32(i))
	return netip.AddrFrom16([16]byte{0x20, 0x01, 0x0d, 0xb8, byte(n >> 24), byte(n >> 16), byte(n >> 8), byte(n), 15: byte(1 + i%250)})
}

// mix24 and mix32 are bijections (an odd multiplier, then an xorshift)
// that scatter consecutive numbers.
func mix24(x uint32) uint32 {
	x = (x * 0x9e3779) & 0xffffff
	return x ^ x>>12
}

func mix32(x uint32) uint32 {
	x *= 0x9e3779b1
	return x ^ x>>16
}
