package memory

import (
	"encoding/binary"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/policyd-mail/policyd/store"
)

// Keys are packed before they are stored. Nearly every key is
// "policyd:{<client>}:<rule>:<what>", where the client is an address or a
// network and <what> is a word or a network too: some 45 bytes of text
// that pack into 8 to 16. With a million clients that is most of a
// record, so it is most of the store's memory.
//
// A packed key starts with a form byte:
//
//	formRaw     the key's bytes as they are
//	formPolicyd three segments (client, rule, what) of the key's shape
//
// and a segment with a type byte:
//
//	segRaw          uvarint length, bytes
//	segWord         uvarint id of an interned word (ids >= wordInline)
//	segIP4, segIP6  the address's 4 or 16 bytes
//	segPfx4,segPfx6 the address's bytes and the prefix length
//	segInline + id  an interned word with a small id, in the type byte
//
// Packing is a function of the key alone (an address is packed only when
// it prints back as the same text; a word, once interned, stays so), so
// two keys are equal exactly when their packed forms are, and unpacking
// gives the key back.
//
// Only words that cannot come from clients are interned: rule names
// (with their instance number: "client_stats:1") and record names
// without digits ("sessions"). Anything else would fill the dictionary
// with one client's worth of words each.
const (
	formRaw     = 0
	formPolicyd = 1

	segRaw     = 0
	segWord    = 1
	segIP4     = 2
	segIP6     = 3
	segPfx4    = 4
	segPfx6    = 5
	segInline  = 16
	wordInline = 256 - segInline

	// maxWords bounds the dictionary: words come from rule names and
	// the rules' fixed record names, not from what clients send, but a
	// bound keeps a surprise from growing it for ever.
	maxWords = 1024
	// maxWordLen: longer segments (greylisting's triplet hashes) are
	// unique per record, so interning them would only fill the dictionary.
	maxWordLen = 24

	keyPrefix = store.Prefix + "{"
)

// keyCodec packs and unpacks keys; it is shared by the shards of a Store.
type keyCodec struct {
	// ids is replaced, never changed, when a word is added, so lookups
	// take no lock.
	ids   atomic.Pointer[map[string]uint32]
	mu    sync.Mutex // serialises additions
	words atomic.Pointer[[]string]
}

func newKeyCodec() *keyCodec {
	c := &keyCodec{}
	c.ids.Store(&map[string]uint32{})
	c.words.Store(&[]string{})
	return c
}

// word returns w's id, interning it if there is room.
func (c *keyCodec) word(w string) (uint32, bool) {
	if id, ok := (*c.ids.Load())[w]; ok {
		return id, true
	}
	if len(w) > maxWordLen {
		return 0, false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	old := *c.ids.Load()
	if id, ok := old[w]; ok {
		return id, true
	}
	if len(old) >= maxWords {
		return 0, false
	}
	id := uint32(len(old))
	ids := make(map[string]uint32, len(old)+1)
	for k, v := range old {
		ids[k] = v
	}
	w = strings.Clone(w)
	ids[w] = id
	words := append(append([]string(nil), *c.words.Load()...), w)
	// words first: a reader that finds the id must find the word.
	c.words.Store(&words)
	c.ids.Store(&ids)
	return id, true
}

// pack appends key's packed form to dst.
func (c *keyCodec) pack(dst []byte, key string) []byte {
	rest, ok := strings.CutPrefix(key, keyPrefix)
	if ok {
		tag, after, ok1 := strings.Cut(rest, "}:")
		rule, what, ok2 := strings.Cut(after, ":")
		if ok1 && ok2 && tag != "" && !strings.Contains(tag, "}") {
			// A numbered instance ("client_stats:1") joins the rule's
			// word. Only rule names come this way today; a record name
			// built from client text must not start with up to four
			// digits and a colon, or its number would be interned.
			if n := instanceLen(what); n > 0 && !isAddr(what) {
				rule, what = after[:len(rule)+1+n], what[n+1:]
			}
			dst = append(dst, formPolicyd)
			dst = c.packSeg(dst, tag, false)
			dst = c.packSeg(dst, rule, true)
			return c.packSeg(dst, what, !strings.ContainsAny(what, "0123456789"))
		}
	}
	dst = append(dst, formRaw)
	return append(dst, key...)
}

func (c *keyCodec) packSeg(dst []byte, s string, intern bool) []byte {
	if p, ok := packAddr(dst, s); ok {
		return p
	}
	if intern {
		if id, ok := c.word(s); ok {
			if id < wordInline {
				return append(dst, byte(segInline+id))
			}
			dst = append(dst, segWord)
			return binary.AppendUvarint(dst, uint64(id))
		}
	}
	dst = append(dst, segRaw)
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

// instanceLen is the length of the instance number that starts s
// ("1:10.1.2.3/32" for the rule instance "client_stats:1"), or 0.
func instanceLen(s string) int {
	for i := 0; i < len(s) && i <= 4; i++ {
		switch c := s[i]; {
		case c == ':' && i > 0:
			return i
		case c < '0' || c > '9':
			return 0
		}
	}
	return 0
}

func isAddr(s string) bool {
	var scratch [24]byte
	_, ok := packAddr(scratch[:0], s)
	return ok
}

// packAddr packs s if it is an address or a network printed the way
// netip prints it, so that unpacking gives the same text.
func packAddr(dst []byte, s string) ([]byte, bool) {
	if s == "" || len(s) > 50 || !(s[0] >= '0' && s[0] <= '9' || s[0] >= 'a' && s[0] <= 'f' || s[0] == ':') {
		return dst, false
	}
	// Nearly every key holds IPv4 text: that is parsed here, strictly,
	// without the round trip through netip below.
	if a, rest, ok := canonicalIPv4(s); ok {
		if rest == "" {
			return append(append(dst, segIP4), a[:]...), true
		}
		if bits, ok := canonicalBits(rest, 32); ok {
			return append(append(append(dst, segPfx4), a[:]...), bits), true
		}
		return dst, false
	}
	var check [64]byte
	if strings.IndexByte(s, '/') >= 0 {
		p, err := netip.ParsePrefix(s)
		if err != nil || string(p.AppendTo(check[:0])) != s {
			return dst, false
		}
		a := p.Addr()
		if a.Is4() {
			b := a.As4()
			return append(append(append(dst, segPfx4), b[:]...), byte(p.Bits())), true
		}
		b := a.As16()
		return append(append(append(dst, segPfx6), b[:]...), byte(p.Bits())), true
	}
	a, err := netip.ParseAddr(s)
	if err != nil || a.Zone() != "" || string(a.AppendTo(check[:0])) != s {
		return dst, false
	}
	if a.Is4() {
		b := a.As4()
		return append(append(dst, segIP4), b[:]...), true
	}
	b := a.As16()
	return append(append(dst, segIP6), b[:]...), true
}

// canonicalIPv4 reads an IPv4 address at the start of s, as netip
// prints one (no leading zeros), and returns what follows it.
func canonicalIPv4(s string) (a [4]byte, rest string, ok bool) {
	i := 0
	for f := range 4 {
		if f > 0 {
			if i >= len(s) || s[i] != '.' {
				return a, "", false
			}
			i++
		}
		start, v := i, 0
		for i < len(s) && s[i] >= '0' && s[i] <= '9' && i-start < 3 {
			v = v*10 + int(s[i]-'0')
			i++
		}
		if i == start || v > 255 || s[start] == '0' && i-start > 1 {
			return a, "", false
		}
		a[f] = byte(v)
	}
	if i < len(s) && s[i] != '/' {
		return a, "", false
	}
	return a, s[i:], true
}

// canonicalBits reads "/n" with 0 <= n <= max and no leading zeros.
func canonicalBits(s string, max int) (byte, bool) {
	if len(s) < 2 || len(s) > 3 || s[0] != '/' {
		return 0, false
	}
	v := 0
	for _, c := range []byte(s[1:]) {
		if c < '0' || c > '9' {
			return 0, false
		}
		v = v*10 + int(c-'0')
	}
	if v > max || s[1] == '0' && len(s) > 2 {
		return 0, false
	}
	return byte(v), true
}

// unpack gives back the key p was packed from.
func (c *keyCodec) unpack(p []byte) string {
	if len(p) == 0 {
		return ""
	}
	if p[0] == formRaw {
		return string(p[1:])
	}
	var b strings.Builder
	b.WriteString(keyPrefix)
	p = p[1:]
	for _, sep := range []string{"}:", ":", ""} {
		var seg []byte
		seg, p = c.unpackSeg(p)
		b.Write(seg)
		b.WriteString(sep)
	}
	return b.String()
}

func (c *keyCodec) unpackSeg(p []byte) (text, rest []byte) {
	if len(p) == 0 {
		return nil, nil
	}
	t, p := p[0], p[1:]
	switch {
	case t >= segInline:
		return []byte((*c.words.Load())[t-segInline]), p
	case t == segWord:
		id, n := binary.Uvarint(p)
		return []byte((*c.words.Load())[id]), p[n:]
	case t == segRaw:
		l, n := binary.Uvarint(p)
		return p[n : n+int(l)], p[n+int(l):]
	case t == segIP4:
		return netip.AddrFrom4([4]byte(p[:4])).AppendTo(nil), p[4:]
	case t == segIP6:
		return netip.AddrFrom16([16]byte(p[:16])).AppendTo(nil), p[16:]
	case t == segPfx4:
		return netip.PrefixFrom(netip.AddrFrom4([4]byte(p[:4])), int(p[4])).AppendTo(nil), p[5:]
	default: // segPfx6
		return netip.PrefixFrom(netip.AddrFrom16([16]byte(p[:16])), int(p[16])).AppendTo(nil), p[17:]
	}
}

// A hash's fields (fields.go) are stored with their names interned:
// "success" is one byte instead of eight in each of a million client_stats
// records. Each field is a name, then its varint value as in fields.go; a
// name is one byte below nameRaw, an interned word's id, or nameRaw
// followed by the uvarint length and the bytes. Lease sets are not packed
// this way: their members are session ids, unique by design.
const nameRaw = 0xff

// packHash appends the arena form of the packed fields enc to dst.
func (c *keyCodec) packHash(dst []byte, enc string) []byte {
	for enc != "" {
		name, v, rest, ok := nextField(enc)
		if !ok {
			break
		}
		if id, ok := c.word(name); ok && id < nameRaw {
			dst = append(dst, byte(id))
		} else {
			dst = append(dst, nameRaw)
			dst = binary.AppendUvarint(dst, uint64(len(name)))
			dst = append(dst, name...)
		}
		dst = binary.AppendVarint(dst, v)
		enc = rest
	}
	return dst
}

// unpackHash gives back the packed fields packHash was given.
func (c *keyCodec) unpackHash(p []byte) string {
	var stack [64]byte
	buf := stack[:0]
	words := *c.words.Load()
	for len(p) > 0 {
		if b := p[0]; b != nameRaw {
			w := words[b]
			buf = binary.AppendUvarint(buf, uint64(len(w)))
			buf = append(buf, w...)
			p = p[1:]
		} else {
			l, n := binary.Uvarint(p[1:])
			buf = binary.AppendUvarint(buf, l)
			buf = append(buf, p[1+n:1+n+int(l)]...)
			p = p[1+n+int(l):]
		}
		v, n := binary.Varint(p)
		p = p[n:]
		buf = binary.AppendVarint(buf, v)
	}
	return string(buf)
}
