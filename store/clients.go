package store

import (
	"cmp"
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
)

// Record is one stored key about a client, as the admin API shows it.
type Record struct {
	Entry
	// Rule is the rule instance that wrote the key ("greylisting",
	// "connection_shaper:1").
	Rule string
	// About is the address or network the record describes: the client
	// itself, its IPv6 network, or one of client_stats' networks. A
	// record about a network wider than the query also concerns the
	// query's clients, but not only them.
	About netip.Prefix
}

// FindClient lists what is stored about the clients in p: every key
// whose hash tag is an address or network overlapping p (see Key), and,
// for records about a network of their own (client_stats keeps the /24
// of a client under its /8 tag), only those whose network overlaps p.
// Keys under a tag that is not an address (greylisting without
// remote_ip) are about nobody in particular and are left out.
func FindClient(ctx context.Context, st Store, p netip.Prefix) ([]Record, error) {
	p = p.Masked()
	keys, err := st.Scan(ctx, scanPrefix(p))
	if err != nil {
		return nil, fmt.Errorf("find %s: %w", p, err)
	}
	var out []Record
	for _, k := range keys {
		rule, about, ok := parseClientKey(k)
		if !ok || !about.Overlaps(p) {
			continue
		}
		e, found, err := st.Inspect(ctx, k)
		if err != nil {
			return nil, fmt.Errorf("find %s: %w", p, err)
		}
		if !found {
			continue // expired between the scan and now
		}
		out = append(out, Record{Entry: e, Rule: rule, About: about})
	}
	// The client's own records first, then ever wider networks.
	slices.SortStableFunc(out, func(a, b Record) int {
		return cmp.Or(cmp.Compare(b.About.Bits(), a.About.Bits()), cmp.Compare(a.Rule, b.Rule), strings.Compare(a.Key, b.Key))
	})
	return out, nil
}

// scanPrefix narrows the key scan: every tag about an IPv4 address or a
// network of /8 or longer starts with the first octet and a dot, and
// every IPv6 one of /16 or longer with its first group and a colon, when
// that group is not 0 (which the text form compresses away).
func scanPrefix(p netip.Prefix) string {
	all := Prefix + "{"
	a := p.Addr()
	switch {
	case a.Is4() && p.Bits() >= 8:
		return all + strconv.Itoa(int(a.As4()[0])) + "."
	case a.Is6() && p.Bits() >= 16:
		b := a.As16()
		if g := int(b[0])<<8 | int(b[1]); g != 0 {
			return all + strconv.FormatInt(int64(g), 16) + ":"
		}
	}
	return all
}

// parseClientKey takes "policyd:{tag}:rule[:N]:what" apart. The record is
// about what when what is a network (client_stats), else about the tag.
func parseClientKey(k string) (rule string, about netip.Prefix, ok bool) {
	rest, ok := strings.CutPrefix(k, Prefix+"{")
	if !ok {
		return "", netip.Prefix{}, false
	}
	tag, rest, ok := strings.Cut(rest, "}:")
	if !ok {
		return "", netip.Prefix{}, false
	}
	about, ok = parseNet(tag)
	if !ok {
		return "", netip.Prefix{}, false
	}
	rule, what, _ := strings.Cut(rest, ":")
	// A record about a network of its own (client_stats) keeps it under
	// its widest network's tag, so the network lies inside the tag. That
	// tells "rule:N:what" (instance N) from an IPv6 network that starts
	// with digits: "client_stats:1:2001:db8::/48" is instance 1, and
	// "client_stats:2001:db8::/48" is no instance.
	inTag := func(w string) (netip.Prefix, bool) {
		n, ok := aboutNet(w)
		return n, ok && n.Bits() >= about.Bits() && about.Contains(n.Addr())
	}
	if w, ok := inTag(what); ok {
		return rule, w, rule != ""
	}
	if n, more, found := strings.Cut(what, ":"); found && n != "" && strings.Trim(n, "0123456789") == "" {
		rule, what = rule+":"+n, more
	}
	if w, ok := inTag(what); ok {
		about = w
	}
	return rule, about, rule != ""
}

func aboutNet(what string) (netip.Prefix, bool) {
	if !strings.Contains(what, "/") {
		return netip.Prefix{}, false
	}
	return parseNet(what)
}

func parseNet(s string) (netip.Prefix, bool) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return netip.Prefix{}, false
		}
		// An IPv4-mapped network is the IPv4 network, as an address is.
		if a := p.Addr(); a.Is4In6() && p.Bits() >= 96 {
			p = netip.PrefixFrom(a.Unmap(), p.Bits()-96)
		}
		return p.Masked(), true
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, false
	}
	a = a.Unmap()
	return netip.PrefixFrom(a, a.BitLen()), true
}

// ParseClient reads the admin API's IP-or-CIDR argument. An address is
// its own /32 or /128; an IPv4-mapped IPv6 address is its IPv4 address.
func ParseClient(s string) (netip.Prefix, error) {
	p, ok := parseNet(strings.TrimSpace(s))
	if !ok || !p.IsValid() {
		return netip.Prefix{}, fmt.Errorf("%q is neither an IP address nor a CIDR network", s)
	}
	return p, nil
}

// ipv6Client is the network the rules count one IPv6 client by, unless
// configured otherwise (ipv6_prefix; rules.DefaultIPv6Prefix, which the
// store cannot import).
const ipv6Client = 64

// ForgetClient deletes what FindClient lists for p, except the records
// about a network wider than p: those hold other clients' history too
// (client_stats' /24 and /8, a greylisting network), so they are
// returned as kept, and forgetting that network removes them. For an
// IPv6 address or network narrower than /64, p's /64 counts as the
// client: the per-client rules key IPv6 clients by it.
func ForgetClient(ctx context.Context, st Store, p netip.Prefix) (deleted, kept []Record, err error) {
	p = p.Masked()
	found, err := FindClient(ctx, st, p)
	if err != nil {
		return nil, nil, err
	}
	// Delete takes keys of one hash tag at a time (one Cluster slot).
	byTag := map[string][]string{}
	var tags []string
	// The rules count an IPv6 client by its /64 (rules.ClientKey), so
	// forgetting an IPv6 address forgets its /64's records too.
	own := p
	if p.Addr().Is6() && p.Bits() > ipv6Client {
		own = netip.PrefixFrom(p.Addr(), ipv6Client).Masked()
	}
	for _, r := range found {
		if r.About.Bits() < own.Bits() {
			kept = append(kept, r)
			continue
		}
		deleted = append(deleted, r)
		tag := HashTag(r.Key)
		if _, ok := byTag[tag]; !ok {
			tags = append(tags, tag)
		}
		byTag[tag] = append(byTag[tag], r.Key)
	}
	for _, tag := range tags {
		if err := st.Delete(ctx, byTag[tag]...); err != nil {
			return nil, nil, fmt.Errorf("forget %s: %w", p, err)
		}
	}
	return deleted, kept, nil
}
