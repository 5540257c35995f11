package memory

import (
	"encoding/binary"
	"net/netip"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/policyd-mail/policyd/store"
)

// Keys are packed before they are stored. Nearly every key follows the
// grammar of store/key.go, "policyd:{TAG}:NAME[:N]:SEG…": some 45 bytes
// of text that pack into 8 to 16. With a million clients that is most of
// a record, so it is most of the store's memory.
//
// A packed key starts with a form byte:
//
//	formRaw  the key's bytes as they are (keys outside the grammar)
//	formKey  the tag, the rule instance, then each record segment
//
// and each part with a type byte:
//
//	segRaw          uvarint length, bytes (tokens, user text)
//	segWord         uvarint id of an interned word (ids >= wordInline)
//	segInline + id  an interned word with a small id, in the type byte
//	segIP4, segIP6  the address's 4 or 16 bytes
//	segPfx4,segPfx6 the address's bytes and the prefix length
//	segAny          the tag "any"
//	segValue        WORD=TEXT: the word as a part, then TEXT as segRaw
//
// A network after the rule is the grammar's @NET. Packing follows from
// the key alone (store.ParseKey accepts an address only in the form it
// prints back as; a word, once interned, stays so), so two keys are
// equal exactly when their packed forms are, and unpacking gives the key
// back.
//
// Only what the grammar calls a rule's own words are interned: rule
// instance names ("client_stats:1") and WORD segments ("sessions"). User
// text is a TEXT or a TOKEN and never is, so no client can fill the
// dictionary and push the rules' words out of it.
const (
	formRaw = 0
	formKey = 2

	segRaw     = 0
	segWord    = 1
	segIP4     = 2
	segIP6     = 3
	segPfx4    = 4
	segPfx6    = 5
	segAny     = 6
	segValue   = 7
	segInline  = 16
	wordInline = 256 - segInline

	// maxWords bounds the dictionary: words come from rule names and
	// the rules' fixed record names, not from what clients send, but a
	// bound keeps a surprise (a script minting words) from growing it.
	maxWords = 1024
	// maxWordLen: rule instance names are longer than the grammar's
	// words; nothing longer is interned.
	maxWordLen = 40
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
	// A copy of its own: w is often part of a key, which the
	// dictionary must not keep alive (nor make escape).
	kept := strings.Clone(w)
	ids[kept] = id
	words := append(append([]string(nil), *c.words.Load()...), kept)
	// words first: a reader that finds the id must find the word.
	c.words.Store(&words)
	c.ids.Store(&ids)
	return id, true
}

// pack appends key's packed form to dst.
func (c *keyCodec) pack(dst []byte, key string) []byte {
	var segs [store.MaxSegs]store.Seg
	p, ok := store.ParseKeyInto(key, &segs)
	if !ok {
		dst = append(dst, formRaw)
		return append(dst, key...)
	}
	dst = append(dst, formKey)
	dst = c.packPart(dst, p.Tag)
	dst = c.packWord(dst, p.Rule())
	for _, s := range p.Segs {
		dst = c.packPart(dst, s)
	}
	return dst
}

func (c *keyCodec) packPart(dst []byte, s store.Seg) []byte {
	switch s.Kind {
	case store.SegAny:
		return append(dst, segAny)
	case store.SegWord:
		return c.packWord(dst, s.Word)
	case store.SegNet:
		a := s.Net.Addr()
		bare := strings.IndexByte(s.Raw(), '/') < 0
		switch {
		case a.Is4() && bare:
			b := a.As4()
			return append(append(dst, segIP4), b[:]...)
		case a.Is4():
			b := a.As4()
			return append(append(append(dst, segPfx4), b[:]...), byte(s.Net.Bits()))
		case bare:
			b := a.As16()
			return append(append(dst, segIP6), b[:]...)
		}
		b := a.As16()
		return append(append(append(dst, segPfx6), b[:]...), byte(s.Net.Bits()))
	case store.SegValue:
		w, text, _ := strings.Cut(s.Raw(), "=")
		dst = c.packWord(append(dst, segValue), w)
		return appendRaw(dst, text)
	}
	return appendRaw(dst, s.Raw()) // a token
}

// packWord interns w if there is room, else writes it as text.
func (c *keyCodec) packWord(dst []byte, w string) []byte {
	if id, ok := c.word(w); ok {
		if id < wordInline {
			return append(dst, byte(segInline+id))
		}
		dst = append(dst, segWord)
		return binary.AppendUvarint(dst, uint64(id))
	}
	return appendRaw(dst, w)
}

func appendRaw(dst []byte, s string) []byte {
	dst = append(dst, segRaw)
	dst = binary.AppendUvarint(dst, uint64(len(s)))
	return append(dst, s...)
}

// unpack gives back the key p was packed from.
func (c *keyCodec) unpack(p []byte) string {
	return string(c.appendKey(make([]byte, 0, 64), p))
}

// appendKey appends the key p was packed from to b: a scan reuses one
// buffer for every record instead of a string each.
func (c *keyCodec) appendKey(b, p []byte) []byte {
	if len(p) == 0 {
		return b
	}
	if p[0] == formRaw {
		return append(b, p[1:]...)
	}
	b = append(b, store.Prefix+"{"...)
	b, p = c.unpackPart(b, p[1:])
	b = append(b, "}:"...)
	b, p = c.unpackPart(b, p) // the rule instance
	for len(p) > 0 {
		b = append(b, ':')
		if t := p[0]; t >= segIP4 && t <= segPfx6 {
			b = append(b, '@')
		}
		b, p = c.unpackPart(b, p)
	}
	return b
}

func (c *keyCodec) unpackPart(b, p []byte) (out, rest []byte) {
	t, p := p[0], p[1:]
	switch {
	case t >= segInline:
		return append(b, (*c.words.Load())[t-segInline]...), p
	case t == segWord:
		id, n := binary.Uvarint(p)
		return append(b, (*c.words.Load())[id]...), p[n:]
	case t == segRaw:
		l, n := binary.Uvarint(p)
		return append(b, p[n:n+int(l)]...), p[n+int(l):]
	case t == segAny:
		return append(b, store.Any...), p
	case t == segValue:
		b, p = c.unpackPart(b, p)
		return c.unpackPart(append(b, '='), p)
	case t == segIP4:
		return netip.AddrFrom4([4]byte(p[:4])).AppendTo(b), p[4:]
	case t == segIP6:
		return netip.AddrFrom16([16]byte(p[:16])).AppendTo(b), p[16:]
	case t == segPfx4:
		return netip.PrefixFrom(netip.AddrFrom4([4]byte(p[:4])), int(p[4])).AppendTo(b), p[5:]
	default: // segPfx6
		return netip.PrefixFrom(netip.AddrFrom16([16]byte(p[:16])), int(p[16])).AppendTo(b), p[17:]
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
