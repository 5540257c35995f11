package store

import (
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// The key grammar. Every key a rule writes is
//
//	policyd:{TAG}:NAME[:N]:SEG[:SEG...]
//
// and every part has a type that its text alone tells, so one parser
// (ParseKey) serves the admin API and the embedded store's packer alike,
// without knowing any rule:
//
//	TAG   what the key is about, and its Redis Cluster hash tag (the keys
//	      of one client, or of one SASL user, share a slot):
//	        NET         an address or CIDR network as net/netip prints it
//	                    ("192.0.2.7", "2001:db8:1:2::/64", "10.0.0.0/8")
//	        any         about nobody in particular (greylisting without
//	                    remote_ip)
//	        WORD=TEXT   a value of an attribute ("sasl_username=alice")
//	NAME  the rule's registered name, [a-z][a-z0-9_]*; N, 1 to 4 digits,
//	      the instance number of NAME:N in the plugins file
//	SEG   one of
//	        WORD        [a-z][a-z_]*, at most 24 bytes: the rule's own
//	                    words ("sessions", "offender", "triplet"). The
//	                    embedded store interns these and nothing else.
//	        TOKEN       [0-9a-z_]+, not a word: a hash, a number. Never
//	                    interned. Not first (it would read as N).
//	        WORD=TEXT   a value, as in TAG
//	        @NET        an address or network the record is about, when
//	                    it is not the tag's (client_stats keeps a
//	                    client's /24 under its /8 tag). Last only: an
//	                    IPv6 network holds colons.
//
// TEXT is free user text (a SASL login, a sender, a script's own key)
// escaped so it can break nothing: every byte outside [A-Za-z0-9._@+-]
// is written %XX. It never holds ':', '{', '}' or '=', so it cannot end
// a segment or the hash tag early, and no user text is ever a WORD.
//
// Keys outside the grammar (the readiness probe's, the tests') are
// stored like any other, as plain bytes.

// Prefix starts every key policyd writes, so a shared Redis can be inspected
// and cleaned by pattern.
const Prefix = "policyd:"

// Any is the tag of keys about nobody in particular.
const Any = "any"

// maxWord is the longest WORD: longer lowercase runs are TOKENs.
const maxWord = 24

// SegKind is the type of a key segment.
type SegKind uint8

// The segment kinds of the grammar.
const (
	SegWord  SegKind = iota + 1 // a rule's own word
	SegToken                    // [0-9a-z_]+, not a word
	SegValue                    // WORD=TEXT; Text holds TEXT unescaped
	SegNet                      // @NET, or a NET tag
	SegAny                      // the "any" tag
)

// Seg is one typed part of a key.
type Seg struct {
	Kind SegKind
	// Word is the text of a word or token, or the attribute of a value.
	Word string
	// Text is a value's text, unescaped.
	Text string
	// Net is the address (as a /32 or /128) or network of a SegNet.
	Net netip.Prefix
	// raw is the segment as it appears in the key.
	raw string
}

// Raw is the segment as written in the key.
func (s Seg) Raw() string { return s.raw }

// ParsedKey is a key taken apart by ParseKey.
type ParsedKey struct {
	Tag      Seg
	Name     string // the rule's registered name
	Instance string // "" or the digits of NAME:N
	Segs     []Seg
}

// Rule is the rule instance as logs and metrics name it ("client_stats:1").
func (p ParsedKey) Rule() string {
	if p.Instance == "" {
		return p.Name
	}
	return p.Name + ":" + p.Instance
}

// About is the address or network the key is about: its @NET segment,
// else a NET tag; ok is false for keys about no address.
func (p ParsedKey) About() (netip.Prefix, bool) {
	if n := len(p.Segs); n > 0 && p.Segs[n-1].Kind == SegNet {
		return p.Segs[n-1].Net, true
	}
	if p.Tag.Kind == SegNet {
		return p.Tag.Net, true
	}
	return netip.Prefix{}, false
}

// String gives the key back.
func (p ParsedKey) String() string {
	var b strings.Builder
	b.WriteString(Prefix)
	b.WriteByte('{')
	b.WriteString(p.Tag.raw)
	b.WriteString("}:")
	b.WriteString(p.Name)
	if p.Instance != "" {
		b.WriteByte(':')
		b.WriteString(p.Instance)
	}
	for _, s := range p.Segs {
		b.WriteByte(':')
		b.WriteString(s.raw)
	}
	return b.String()
}

// MaxSegs is the most record segments a key of the grammar has.
const MaxSegs = 16

// ParseKey takes a key of the grammar apart; ok is false for any other.
func ParseKey(k string) (p ParsedKey, ok bool) {
	var segs [MaxSegs]Seg
	p, ok = ParseKeyInto(k, &segs)
	p.Segs = append([]Seg(nil), p.Segs...)
	return p, ok
}

// ParseKeyInto is ParseKey with the segments in segs, an array of the
// caller's, so a hot path (the embedded store packs every key it is
// given) parses without allocating.
func ParseKeyInto(k string, segs *[MaxSegs]Seg) (p ParsedKey, ok bool) {
	rest, ok := strings.CutPrefix(k, Prefix+"{")
	if !ok {
		return p, false
	}
	tag, rest, ok := strings.Cut(rest, "}:")
	if !ok {
		return p, false
	}
	if p.Tag, ok = parseTag(tag); !ok {
		return p, false
	}
	p.Name, rest, ok = strings.Cut(rest, ":")
	if !ok || !isName(p.Name) {
		return p, false
	}
	if n, more, found := strings.Cut(rest, ":"); found && isInstance(n) {
		p.Instance, rest = n, more
	}
	for n := 0; n < MaxSegs; n++ {
		if strings.HasPrefix(rest, "@") {
			s, ok := parseNetSeg(rest[1:])
			if !ok {
				return p, false
			}
			s.raw = rest
			segs[n] = s
			p.Segs = segs[:n+1]
			return p, true
		}
		seg, more, last := strings.Cut(rest, ":")
		s, ok := parseSeg(seg)
		if !ok || n == 0 && s.Kind == SegToken {
			return p, false
		}
		segs[n] = s
		if !last {
			p.Segs = segs[:n+1]
			return p, true
		}
		rest = more
	}
	return p, false
}

func parseTag(t string) (Seg, bool) {
	if t == Any {
		return Seg{Kind: SegAny, raw: t}, true
	}
	if s, ok := parseValue(t); ok {
		return s, true
	}
	return parseNetSeg(t)
}

func parseSeg(s string) (Seg, bool) {
	switch {
	case isWord(s):
		return Seg{Kind: SegWord, Word: s, raw: s}, true
	case isToken(s):
		return Seg{Kind: SegToken, Word: s, raw: s}, true
	}
	return parseValue(s)
}

func parseValue(s string) (Seg, bool) {
	w, text, ok := strings.Cut(s, "=")
	if !ok || !isWord(w) {
		return Seg{}, false
	}
	u, ok := unescape(text)
	if !ok {
		return Seg{}, false
	}
	return Seg{Kind: SegValue, Word: w, Text: u, raw: s}, true
}

// parseNetSeg reads an address or network written as net/netip writes
// it: only then does the key's text follow from the parsed value.
func parseNetSeg(s string) (Seg, bool) {
	if n, ok := parseV4Net(s); ok {
		return Seg{Kind: SegNet, Net: n, raw: s}, true
	}
	return parseNetSegSlow(s)
}

// parseV4Net reads the IPv4 addresses and networks of the mail path's
// keys in one pass (the embedded store parses every key it is given). It
// takes only text netip would print, so it agrees with parseNetSegSlow
// wherever it answers; anything else goes there.
func parseV4Net(s string) (netip.Prefix, bool) {
	var a [4]byte
	i := 0
	for o := range 4 {
		if o > 0 {
			if i >= len(s) || s[i] != '.' {
				return netip.Prefix{}, false
			}
			i++
		}
		v, n := decimal(s[i:], 255)
		if n == 0 {
			return netip.Prefix{}, false
		}
		a[o], i = byte(v), i+n
	}
	addr := netip.AddrFrom4(a)
	if i == len(s) {
		return netip.PrefixFrom(addr, 32), true
	}
	if s[i] != '/' {
		return netip.Prefix{}, false
	}
	bits, n := decimal(s[i+1:], 32)
	if n == 0 || i+1+n != len(s) {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(addr, bits), true
}

// decimal reads a number at most limit at the start of s as netip prints
// one (no sign, no leading zero); n is the digits read, 0 if none fit.
func decimal(s string, limit int) (v, n int) {
	for n < len(s) && n < 3 && isDigit(s[n]) {
		v = v*10 + int(s[n]-'0')
		n++
	}
	if n == 0 || n > 1 && s[0] == '0' || v > limit || n < len(s) && isDigit(s[n]) {
		return 0, 0
	}
	return v, n
}

func parseNetSegSlow(s string) (Seg, bool) {
	var n netip.Prefix
	var check [64]byte
	if strings.IndexByte(s, '/') >= 0 {
		p, err := netip.ParsePrefix(s)
		if err != nil || string(p.AppendTo(check[:0])) != s {
			return Seg{}, false
		}
		n = p
	} else {
		a, err := netip.ParseAddr(s)
		if err != nil || a.Zone() != "" || string(a.AppendTo(check[:0])) != s {
			return Seg{}, false
		}
		n = netip.PrefixFrom(a, a.BitLen())
	}
	return Seg{Kind: SegNet, Net: n, raw: s}, true
}

func isName(s string) bool {
	return s != "" && isLower(s[0]) && all(s, isNameByte)
}

func isInstance(s string) bool {
	return s != "" && len(s) <= 4 && all(s, isDigit)
}

// isWord: [a-z][a-z_]*, at most maxWord bytes.
func isWord(s string) bool {
	return s != "" && len(s) <= maxWord && isLower(s[0]) && all(s, func(c byte) bool { return isLower(c) || c == '_' })
}

// isToken: [0-9a-z_]+.
func isToken(s string) bool {
	return s != "" && all(s, isNameByte)
}

func isLower(c byte) bool    { return c >= 'a' && c <= 'z' }
func isDigit(c byte) bool    { return c >= '0' && c <= '9' }
func isNameByte(c byte) bool { return isLower(c) || isDigit(c) || c == '_' }

// all reports whether every byte of s passes ok.
func all(s string, ok func(byte) bool) bool {
	for i := 0; i < len(s); i++ {
		if !ok(s[i]) {
			return false
		}
	}
	return true
}

// textSafe are the bytes TEXT keeps as they are.
func textSafe(c byte) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
		c == '.' || c == '_' || c == '@' || c == '+' || c == '-'
}

// Escape writes user text as a key's TEXT.
func Escape(s string) string {
	n := 0
	for i := 0; i < len(s); i++ {
		if !textSafe(s[i]) {
			n++
		}
	}
	if n == 0 {
		return s
	}
	const hex = "0123456789ABCDEF"
	b := make([]byte, 0, len(s)+2*n)
	for i := 0; i < len(s); i++ {
		c := s[i]
		if textSafe(c) {
			b = append(b, c)
			continue
		}
		b = append(b, '%', hex[c>>4], hex[c&15])
	}
	return string(b)
}

// unescape reads TEXT written by Escape, and only that: the key's text
// must follow from the value, or two keys would mean one thing.
func unescape(s string) (string, bool) {
	if strings.IndexByte(s, '%') < 0 {
		for i := 0; i < len(s); i++ {
			if !textSafe(s[i]) {
				return "", false
			}
		}
		return s, true
	}
	b := make([]byte, 0, len(s))
	for i := 0; i < len(s); i++ {
		c := s[i]
		if textSafe(c) {
			b = append(b, c)
			continue
		}
		if c != '%' || i+2 >= len(s) {
			return "", false
		}
		v, err := strconv.ParseUint(s[i+1:i+3], 16, 8)
		if err != nil || textSafe(byte(v)) || s[i+1:i+3] != strings.ToUpper(s[i+1:i+3]) {
			return "", false
		}
		b = append(b, byte(v))
		i += 2
	}
	return string(b), true
}

// ClientNet is the network a client is counted by: the address itself
// (a /32) for IPv4, its /v6bits network for IPv6, since one IPv6 host
// usually owns a whole /64 and would otherwise dodge every per-address
// limit. An IPv4-mapped address is its IPv4 address.
func ClientNet(a netip.Addr, v6bits int) netip.Prefix {
	a = a.Unmap()
	if a.Is4() {
		return netip.PrefixFrom(a, 32)
	}
	p, err := a.Prefix(v6bits)
	if err != nil {
		return netip.PrefixFrom(a, a.BitLen())
	}
	return p
}

// clientPart is a client's TAG: an IPv4 address as it is, an IPv6
// client's network with its length, and "any" for no address.
func clientPart(a netip.Addr, v6bits int) part {
	if !a.IsValid() {
		return part{s: Any}
	}
	n := ClientNet(a, v6bits)
	return part{n: n, addr: n.Addr().Is4()}
}

// part is a tag or an @NET segment, written into the key as it is built:
// the keys of the mail path are built for every session, and printing
// each address to a string of its own first doubled their allocations.
type part struct {
	s    string       // text as it is; else n
	n    netip.Prefix // a network, or an address as a /32 with addr
	addr bool         // print n's address alone
}

func (p part) appendTo(b []byte) []byte {
	switch {
	case p.s != "":
		return append(b, p.s...)
	case !p.n.IsValid():
		// No rule passes one; written as before, never silently dropped.
		return append(b, p.n.String()...)
	case p.addr:
		return p.n.Addr().AppendTo(b)
	}
	return p.n.AppendTo(b)
}

// Keys builds the keys of one rule instance. The zero value is not
// usable; get one from NewKeys.
type Keys struct {
	rule   string // NAME[:N]
	v6bits int
}

// NewKeys returns the key builder of rule instance rule ("client_stats",
// "connection_shaper:1"), counting IPv6 clients by their /v6bits.
func NewKeys(rule string, v6bits int) Keys {
	name, n, _ := strings.Cut(rule, ":")
	if !isName(name) || n != "" && !isInstance(n) {
		panic(fmt.Sprintf("store.NewKeys: %q is not a rule instance name", rule))
	}
	return Keys{rule: rule, v6bits: v6bits}
}

// Rule is the instance the keys belong to.
func (k Keys) Rule() string { return k.rule }

// IPv6Prefix is the network an IPv6 client is counted by.
func (k Keys) IPv6Prefix() int { return k.v6bits }

// Client is the key of a record about client a: "policyd:{a}:rule:words".
func (k Keys) Client(a netip.Addr, words ...string) string {
	return k.build(clientPart(a, k.v6bits), words, nil)
}

// Net is the key of a record about network n, under network tag: what
// client_stats keeps of a client's /24 under its /8 ("…:@10.1.2.0/24").
func (k Keys) Net(tag, n netip.Prefix, words ...string) string {
	return k.build(part{n: tag}, words, &part{n: n})
}

// Under is the key of a record filed under network tag without being
// about it alone (greylisting's triplets of one network).
func (k Keys) Under(tag netip.Prefix, words ...string) string {
	return k.build(part{n: tag}, words, nil)
}

// Any is the key of a record about nobody in particular.
func (k Keys) Any(words ...string) string {
	return k.build(part{s: Any}, words, nil)
}

// Value is the key of a record about a value of an attribute: a SASL
// login, a sender ("policyd:{sasl_username=alice}:ratelimit:messages").
// attr must be a WORD; value is any text.
func (k Keys) Value(attr, value string, words ...string) string {
	return k.build(part{s: ValueSeg(attr, value)}, words, nil)
}

// ValueSeg is attr=value as a segment, for a key with several values
// (a compound ratelimit key): pass it among Value's words.
func ValueSeg(attr, value string) string {
	if !isWord(attr) {
		panic(fmt.Sprintf("store: attribute %q is not a key word", attr))
	}
	return attr + "=" + Escape(value)
}

// build writes the key in a buffer on the stack: one allocation, the
// key itself. last, when not nil, is the @NET segment.
func (k Keys) build(tag part, words []string, last *part) string {
	var buf [128]byte
	b := append(buf[:0], Prefix...)
	b = append(b, '{')
	b = tag.appendTo(b)
	b = append(b, "}:"...)
	b = append(b, k.rule...)
	for i, w := range words {
		// A record's first part cannot be a number: it would read as
		// an instance. Words are the rule's own constants, so a bad one
		// is a programming error.
		if !isWord(w) {
			if s, ok := parseSeg(w); !ok || i == 0 && s.Kind == SegToken {
				panic(fmt.Sprintf("store: %q is not a key segment of rule %s", w, k.rule))
			}
		}
		b = append(b, ':')
		b = append(b, w...)
	}
	if last != nil {
		b = append(b, ":@"...)
		b = last.appendTo(b)
	}
	return string(b)
}

// Key builds "policyd:{tag}:rule:what" from text as it is, for tests
// and tools that need a key of a given shape; rules use Keys.
func Key(tag, rule, what string) string {
	return Prefix + "{" + tag + "}:" + rule + ":" + what
}

// ClientPrefix is the start of every key under one tag (see Key), for
// the admin API's Scan.
func ClientPrefix(tag string) string {
	return Prefix + "{" + tag + "}:"
}

// MigrateKey rewrites a key of an earlier shape into the grammar, and
// reports whether it did. The one earlier shape is client_stats' before
// @NET: "policyd:{10.0.0.0/8}:client_stats[:N]:10.1.2.0/24", told apart
// from an instance number by the network lying inside the tag.
func MigrateKey(k string) (string, bool) {
	// Most keys are ruled out without a parse: the shape needs a
	// network, and a key with @NET is already the grammar's.
	if strings.IndexByte(k, '/') < 0 || strings.Contains(k, ":@") {
		return k, false
	}
	if _, ok := ParseKey(k); ok {
		return k, false
	}
	rest, ok := strings.CutPrefix(k, Prefix+"{")
	if !ok {
		return k, false
	}
	tagText, rest, ok := strings.Cut(rest, "}:")
	if !ok {
		return k, false
	}
	tag, ok := parseNetSeg(tagText)
	if !ok {
		return k, false
	}
	name, what, ok := strings.Cut(rest, ":")
	if !ok || !isName(name) {
		return k, false
	}
	inTag := func(w string) bool {
		n, ok := parseNetSeg(w)
		// client_stats wrote masked networks only, which is what tells
		// "1:1::/16" (instance 1 of 1::/16) from a network.
		return ok && strings.IndexByte(w, '/') >= 0 && n.Net == n.Net.Masked() &&
			n.Net.Bits() >= tag.Net.Bits() && tag.Net.Contains(n.Net.Addr())
	}
	rule := name
	if !inTag(what) {
		n, more, found := strings.Cut(what, ":")
		if !found || !isInstance(n) || !inTag(more) {
			return k, false
		}
		rule, what = name+":"+n, more
	}
	return Prefix + "{" + tagText + "}:" + rule + ":@" + what, true
}
