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
	out, _, err := FindClientPage(ctx, st, p, "", 0)
	return out, err
}

// FindClientPage is FindClient a page at a time, for a network with more
// records than one answer should carry: the records of the first limit
// keys (in key order) after the key after, and the key to continue after
// ("" when there are no more). limit <= 0 means no limit.
func FindClientPage(ctx context.Context, st Store, p netip.Prefix, after string, limit int) ([]Record, string, error) {
	p = p.Masked()
	keys, err := st.Scan(ctx, scanPrefix(p))
	if err != nil {
		return nil, "", fmt.Errorf("find %s: %w", p, err)
	}
	type match struct {
		key, rule string
		about     netip.Prefix
	}
	var page []match
	next := ""
	for _, k := range keys {
		if after != "" && k <= after {
			continue
		}
		rule, about, ok := parseClientKey(k)
		if !ok || !about.Overlaps(p) {
			continue
		}
		if limit > 0 && len(page) == limit {
			next = page[len(page)-1].key
			break
		}
		page = append(page, match{k, rule, about})
	}
	var out []Record
	for _, m := range page {
		k, rule, about := m.key, m.rule, m.about
		e, found, err := st.Inspect(ctx, k)
		if err != nil {
			return nil, "", fmt.Errorf("find %s: %w", p, err)
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
	return out, next, nil
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

// parseClientKey is the rule and the network of a key about a client
// (see key.go); ok is false for keys about no address.
func parseClientKey(k string) (rule string, about netip.Prefix, ok bool) {
	p, ok := ParseKey(k)
	if !ok {
		return "", netip.Prefix{}, false
	}
	about, ok = p.About()
	if !ok {
		return "", netip.Prefix{}, false
	}
	// An IPv4-mapped network is the IPv4 network, as an address is.
	if a := about.Addr(); a.Is4In6() && about.Bits() >= 96 {
		about = netip.PrefixFrom(a.Unmap(), about.Bits()-96)
	}
	return p.Rule(), about.Masked(), true
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

// ForgetClient deletes what FindClient lists for p, except the records
// about a network wider than p: those hold other clients' history too
// (client_stats' /24 and /8, a greylisting network), so they are
// returned as kept, and forgetting that network removes them. For an
// IPv6 address or network narrower than /v6bits, p's /v6bits network
// counts as the client: the rules count an IPv6 client by it (the
// chain's ClientIPv6Prefix).
func ForgetClient(ctx context.Context, st Store, p netip.Prefix, v6bits int) (deleted, kept []Record, err error) {
	p = p.Masked()
	found, err := FindClient(ctx, st, p)
	if err != nil {
		return nil, nil, err
	}
	// Delete takes keys of one hash tag at a time (one Cluster slot).
	byTag := map[string][]string{}
	var tags []string
	// The rules count an IPv6 client by its network (store.ClientNet),
	// so forgetting an IPv6 address forgets that network's records too.
	own := p
	if p.Addr().Is6() && p.Bits() > v6bits {
		own = netip.PrefixFrom(p.Addr(), v6bits).Masked()
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
