package rules

import (
	"fmt"
	"net/netip"
	"strings"
)

// PrefixList is a set of networks a client address is matched against.
type PrefixList struct {
	prefixes []netip.Prefix
}

// Add parses one item: a CIDR ("10.0.0.0/8", "2001:db8::/32"), a single
// address, or a seed-style dotted IPv4 prefix ("192.168.1.", "10.0.0"),
// which qpsmtpd matched as a string prefix of the address.
func (l *PrefixList) Add(item string) error {
	p, err := ParsePrefix(item)
	if err != nil {
		return err
	}
	l.prefixes = append(l.prefixes, p)
	return nil
}

// ParsePrefix reads one network in any form PrefixList.Add accepts.
func ParsePrefix(item string) (netip.Prefix, error) {
	if strings.Contains(item, "/") {
		p, err := netip.ParsePrefix(item)
		if err != nil {
			return netip.Prefix{}, fmt.Errorf("%q is not a network (like 10.0.0.0/8 or 2001:db8::/32)", item)
		}
		return p.Masked(), nil
	}
	if a, err := netip.ParseAddr(item); err == nil {
		a = a.Unmap()
		return netip.PrefixFrom(a, a.BitLen()), nil
	}
	// Dotted prefix: whole octets only, so "10.0.0" means 10.0.0.0/24.
	// qpsmtpd's regex also matched "10.0.0" against 10.0.0X.Y; no operator
	// means that, so the octet reading is the one we keep.
	trimmed := strings.TrimSuffix(item, ".")
	parts := strings.Split(trimmed, ".")
	if len(parts) == 0 || len(parts) > 3 || trimmed == "" {
		return netip.Prefix{}, fmt.Errorf("%q is not a network (like 10.0.0.0/8, 192.168.1. or 2001:db8::/32)", item)
	}
	full := trimmed + strings.Repeat(".0", 4-len(parts))
	a, err := netip.ParseAddr(full)
	if err != nil || !a.Is4() {
		return netip.Prefix{}, fmt.Errorf("%q is not a network (like 10.0.0.0/8, 192.168.1. or 2001:db8::/32)", item)
	}
	return netip.PrefixFrom(a, 8*len(parts)), nil
}

// Contains reports whether a is in any of the networks.
func (l *PrefixList) Contains(a netip.Addr) bool {
	if l == nil {
		return false
	}
	a = a.Unmap()
	for _, p := range l.prefixes {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// Len is the number of networks.
func (l *PrefixList) Len() int {
	if l == nil {
		return 0
	}
	return len(l.prefixes)
}

func (l *PrefixList) String() string {
	if l == nil {
		return ""
	}
	s := make([]string, len(l.prefixes))
	for i, p := range l.prefixes {
		s[i] = p.String()
	}
	return strings.Join(s, ",")
}
