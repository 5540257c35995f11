package spamthrottle

import (
	"fmt"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/policyd-mail/policyd/rules"
)

// Bounds of the settings. An hour is far beyond any MTA's patience, but
// a delay is only ever capped by the front-end, never refused.
const (
	maxMS   = 3600 * 1000
	maxRcpt = 1 << 20
)

// params are the settings one client gets.
type params struct {
	st, stmax time.Duration
	rcpt      int64 // 0: recipients add nothing
}

// block is one assignment: an IP block and the fields it sets. A nil
// field is empty, "unaffected" in the seed's words: it comes from the
// less specific blocks containing this one, down to the default.
type block struct {
	prefix          netip.Prefix // invalid for the default (empty) block
	st, stmax, rcpt *int64
	where           string               // for messages: "config/spamthrottle:3" or `block "..."`
	fail            func(string, ...any) // reports an error at the block's origin
	eff             params
}

func (b *block) isDefault() bool { return !b.prefix.IsValid() }

// bits orders blocks from the default (-1) to the most specific.
func (b *block) bits() int {
	if b.isDefault() {
		return -1
	}
	return b.prefix.Bits()
}

// contains reports whether every client of o is a client of b.
func (b *block) contains(o *block) bool {
	if b.isDefault() {
		return true
	}
	return !o.isDefault() && b.prefix.Bits() <= o.prefix.Bits() && b.prefix.Contains(o.prefix.Addr())
}

func (b *block) name() string {
	if b.isDefault() {
		return "default"
	}
	return b.prefix.String()
}

// seedFormat is the seed's assignment line, for error messages.
const seedFormat = `"ipblock:dir:st:stmax:flush:rcpt:tg:tg_resp:"`

// parseSeedLine reads one assignment of qmail-spamt(5):
// ipblock:dir:st:stmax:flush:rcpt:tg:tg_resp: — ipblock a CIDR, an
// address or a dotted prefix ("192.168."), empty for the default; empty
// fields are left to less specific blocks. dir, flush, tg and tg_resp
// have no meaning here and come back as warnings when set.
func parseSeedLine(line string) (*block, []string, error) {
	if !strings.Contains(line, ":") {
		return nil, nil, fmt.Errorf("%q has no value (lines are \"key value\", or the seed's %s)", line, seedFormat)
	}
	f := strings.Split(line, ":")
	for _, extra := range f[min(len(f), 8):] {
		if strings.TrimSpace(extra) != "" {
			return nil, nil, fmt.Errorf("%q has more fields than %s (IPv6 blocks take the \"block\" key)", line, seedFormat)
		}
	}
	field := func(i int) string {
		if i < len(f) {
			return strings.TrimSpace(f[i])
		}
		return ""
	}
	b := &block{}
	if ip := field(0); ip != "" {
		p, err := rules.ParsePrefix(ip)
		if err != nil {
			return nil, nil, err
		}
		b.prefix = p
	}
	var err error
	if b.st, err = number("st", field(2), maxMS); err != nil {
		return nil, nil, err
	}
	if b.stmax, err = number("stmax", field(3), maxMS); err != nil {
		return nil, nil, err
	}
	if b.rcpt, err = number("rcpt", field(5), maxRcpt); err != nil {
		return nil, nil, err
	}
	var warns []string
	if d := field(1); d != "" {
		warns = append(warns, fmt.Sprintf("dir %q is ignored: the state lives in policyd's store, one record per client", d))
	}
	if field(4) != "" {
		warns = append(warns, "flush is ignored: the MTA reads the SMTP input itself (Postfix: reject_unauth_pipelining)")
	}
	if field(6) != "" || field(7) != "" {
		warns = append(warns, "tg and tg_resp are ignored: the MTA owns the SMTP connection, so policyd holds its reply instead of writing to the client")
	}
	return b, warns, nil
}

// parseBlock reads the value of a "block" key: a network followed by
// "key value" pairs (st, stmax, rcpt), or a seed assignment line.
func parseBlock(v string) (*block, []string, error) {
	f := strings.Fields(v)
	if len(f) == 0 {
		return nil, nil, fmt.Errorf("empty")
	}
	p, err := rules.ParsePrefix(f[0])
	if err != nil {
		if strings.Contains(f[0], ":") {
			return parseSeedLine(v)
		}
		return nil, nil, err
	}
	if len(f)%2 == 0 {
		return nil, nil, fmt.Errorf("after the network come \"key value\" pairs (st, stmax, rcpt); %q has no value", f[len(f)-1])
	}
	b := &block{prefix: p}
	for i := 1; i < len(f); i += 2 {
		var dst **int64
		limit := int64(maxMS)
		switch f[i] {
		case "st":
			dst = &b.st
		case "stmax":
			dst = &b.stmax
		case "rcpt":
			dst, limit = &b.rcpt, maxRcpt
		default:
			return nil, nil, fmt.Errorf("unknown key %q (a block takes st, stmax and rcpt)", f[i])
		}
		if *dst != nil {
			return nil, nil, fmt.Errorf("%s is set twice", f[i])
		}
		if *dst, err = number(f[i], f[i+1], limit); err != nil {
			return nil, nil, err
		}
	}
	return b, nil, nil
}

// number reads an optional whole number in [0, limit]; empty is nil.
func number(name, v string, limit int64) (*int64, error) {
	if v == "" {
		return nil, nil
	}
	n, err := strconv.ParseInt(v, 10, 64)
	if err != nil {
		return nil, fmt.Errorf("%s: %q is not a whole number", name, v)
	}
	if n < 0 || n > limit {
		return nil, fmt.Errorf("%s: %d is out of range [0, %d]", name, n, limit)
	}
	return &n, nil
}

func ms(n int64) time.Duration { return time.Duration(n) * time.Millisecond }

// apply sets the fields b gives.
func (p *params) apply(b *block) {
	if b.st != nil {
		p.st = ms(*b.st)
	}
	if b.stmax != nil {
		p.stmax = ms(*b.stmax)
	}
	if b.rcpt != nil {
		p.rcpt = *b.rcpt
	}
}

// resolve works out every block's settings: the built-in defaults, then
// each block containing it from the least specific (the default block)
// to itself, so the most specific block wins field by field. The first
// assignment for a block counts (qmail-spamt(5)); later ones are returned
// as warnings. It returns the default settings and the other blocks,
// most specific first.
func resolve(base params, blocks []*block) (params, []*block, []string) {
	var warns []string
	seen := map[netip.Prefix]*block{}
	var uniq []*block
	for _, b := range blocks {
		if first, dup := seen[b.prefix]; dup {
			warns = append(warns, fmt.Sprintf("%s: block %s is assigned again (first at %s); the first assignment is used", b.where, b.name(), first.where))
			continue
		}
		seen[b.prefix] = b
		uniq = append(uniq, b)
	}
	slices.SortStableFunc(uniq, func(a, b *block) int { return a.bits() - b.bits() })
	def := base
	var out []*block
	for i, b := range uniq {
		b.eff = base
		for _, a := range uniq[:i+1] {
			if a.contains(b) {
				b.eff.apply(a)
			}
		}
		if b.eff.st > b.eff.stmax {
			b.fail("st %d is above stmax %d (empty fields come from the less specific blocks)", b.eff.st.Milliseconds(), b.eff.stmax.Milliseconds())
		}
		if b.isDefault() {
			def = b.eff
			continue
		}
		out = append(out, b)
	}
	slices.Reverse(out)
	return def, out, warns
}
