package memory

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/maphash"
	"unsafe"

	"github.com/policyd-mail/policyd/store"
)

// table is one shard's records: an open-addressing index over an arena
// of packed records, both outside the Go heap (mmap.go). A Go map of
// strings to entries cost some 190 bytes a record, twice over once the
// collector's headroom is counted; a record here is about 40 bytes, plus
// 8 to 16 for its index slot, and the collector never sees them.
//
// An index slot is a uint64: the key's 32-bit hash above, the record's
// offset in the arena plus one below; 0 is an empty slot. Collisions probe linearly, and deleting shifts the run
// back instead of leaving tombstones, so lookups never slow down with
// churn.
//
// A record, at any offset (records are not aligned: the padding would
// cost a tenth of the memory):
//
//	expires  int64, little-endian (unix ns, 0: none)
//	kind     one byte
//	klen     uvarint, length of the packed key
//	vcap     uvarint, bytes reserved for the value
//	key      the packed key (keys.go)
//	value    vcap bytes: a varint for kindInt, else uvarint length and
//	         bytes; a hash's field names are interned like key words
//	         (packHash)
//
// A write that fits the reserved bytes is done in place (nearly every
// update: a counter's varint grows a byte at 64 and at 8192); one that
// does not writes a new record and leaves the old one dead. When a
// quarter of the arena is dead, the live records are copied to a fresh
// mapping. Everything is done under the shard's lock.
//
// Only copies of what is stored leave the table: a returned entry's val
// is a string of its own, never a view of the arena, which may be moved
// or unmapped once the lock is released.
type table struct {
	codec *keyCodec
	seed  maphash.Seed

	slots []uint64
	used  int // slots holding a record
	arena []byte
	top   int // bytes of arena written
	dead  int // bytes of arena belonging to no slot

	// The packed form of the last key looked up: most operations read a
	// key and then write it.
	kstr  string
	kbuf  []byte
	khash uint32

	// holdCompaction keeps put from compacting, so that what reserve
	// made room for stays there until the caller is done.
	holdCompaction bool

	// scanning counts the admin scans walking the arena between lock
	// holds: compaction, which moves records, waits until they are done.
	scanning int
}

const (
	recKind = 8
	recVar  = 9

	minSlots = 256
	minArena = 64 << 10
	// maxArena bounds one shard's records (64 shards: 128 GiB): it fits
	// the 32-bit offset of a slot, and an int on any platform.
	maxArena = 1<<31 - 1
	// compactMin keeps small tables from being copied for a few dead bytes.
	compactMin = 16 << 10
)

func offOf(s uint64) int              { return int(uint32(s) - 1) }
func slotOf(h uint32, off int) uint64 { return uint64(h)<<32 | uint64(off+1) }
func hashOf(s uint64) uint32          { return uint32(s >> 32) }

func uvarintLen(x int) int {
	n := 1
	for x >= 0x80 {
		x >>= 7
		n++
	}
	return n
}

func (t *table) packKey(key string) (uint32, []byte) {
	if t.kbuf == nil || key != t.kstr {
		t.kbuf = t.codec.pack(t.kbuf[:0], key)
		t.kstr = key
		// The upper half: the Store picks an untagged key's shard with
		// the low bits of this same hash, so within a shard they are
		// all alike.
		t.khash = uint32(maphash.String(t.seed, key) >> 32)
	}
	return t.khash, t.kbuf
}

// layout reads where the record at off keeps its key and value.
func (t *table) layout(off int) (kAt, klen, vAt, vcap int) {
	p := off + recVar
	kl, n := binary.Uvarint(t.arena[p:])
	p += n
	vc, n := binary.Uvarint(t.arena[p:])
	p += n
	return p, int(kl), p + int(kl), int(vc)
}

func (t *table) keyAt(off int) []byte {
	kAt, kl, _, _ := t.layout(off)
	return t.arena[kAt : kAt+kl]
}

// recordSize is the bytes of a record with a packed key of klen bytes and
// a value of vlen.
func recordSize(klen, vlen int) int {
	return recVar + uvarintLen(klen) + uvarintLen(vlen) + klen + vlen
}

func (t *table) sizeAt(off int) int {
	_, _, vAt, vc := t.layout(off)
	return vAt + vc - off
}

func (t *table) expiresAt(off int) int64 {
	return int64(binary.LittleEndian.Uint64(t.arena[off:]))
}

func (t *table) entryAt(off int) entry {
	e := entry{expires: t.expiresAt(off), kind: kind(t.arena[off+recKind])}
	_, _, vAt, vc := t.layout(off)
	v := t.arena[vAt : vAt+vc]
	if e.kind == kindInt {
		e.n, _ = binary.Varint(v)
		return e
	}
	l, n := binary.Uvarint(v)
	v = v[n : n+int(l)]
	if e.kind == kindHash {
		e.val = t.codec.unpackHash(v)
	} else {
		e.val = string(v)
	}
	return e
}

func (t *table) appendValue(dst []byte, e entry) []byte {
	switch e.kind {
	case kindInt:
		return binary.AppendVarint(dst, e.n)
	case kindHash:
		var stack [48]byte
		h := t.codec.packHash(stack[:0], e.val)
		dst = binary.AppendUvarint(dst, uint64(len(h)))
		return append(dst, h...)
	}
	dst = binary.AppendUvarint(dst, uint64(len(e.val)))
	return append(dst, e.val...)
}

// find returns the slot holding k, or the empty slot where it would go
// (-1 in a table with no slots yet).
func (t *table) find(h uint32, k []byte) (pos int, found bool) {
	if len(t.slots) == 0 {
		return -1, false
	}
	mask := len(t.slots) - 1
	for i := int(h) & mask; ; i = (i + 1) & mask {
		s := t.slots[i]
		if s == 0 {
			return i, false
		}
		if hashOf(s) == h && bytes.Equal(t.keyAt(offOf(s)), k) {
			return i, true
		}
	}
}

func (t *table) len() int { return t.used }

// get returns key's record, expired or not.
func (t *table) get(key string) (entry, bool) {
	h, k := t.packKey(key)
	pos, found := t.find(h, k)
	if !found {
		return entry{}, false
	}
	return t.entryAt(offOf(t.slots[pos])), true
}

// put stores e under key. It fails only when memory cannot be mapped.
func (t *table) put(key string, e entry) error {
	h, k := t.packKey(key)
	var stack [48]byte
	v := t.appendValue(stack[:0], e)
	pos, found := t.find(h, k)
	if found {
		off := offOf(t.slots[pos])
		if _, _, vAt, vc := t.layout(off); len(v) <= vc {
			binary.LittleEndian.PutUint64(t.arena[off:], uint64(e.expires))
			t.arena[off+recKind] = byte(e.kind)
			copy(t.arena[vAt:], v)
			return nil
		}
		old := t.sizeAt(off)
		noff, err := t.alloc(k, v, e)
		if err != nil {
			return err
		}
		t.dead += old
		t.slots[pos] = slotOf(h, noff)
		if !t.holdCompaction {
			t.maybeCompact()
		}
		return nil
	}
	if (t.used+1)*4 > len(t.slots)*3 {
		if err := t.resize(slotsFor(t.used+1, len(t.slots))); err != nil {
			return err
		}
		pos, _ = t.find(h, k)
	}
	off, err := t.alloc(k, v, e)
	if err != nil {
		return err
	}
	t.slots[pos] = slotOf(h, off)
	t.used++
	return nil
}

// slotsFor is the index size (a power of two, at least cur) that holds
// n records at a load of at most 3/4.
func slotsFor(n, cur int) int {
	size := max(minSlots, cur)
	for n*4 > size*3 {
		size *= 2
	}
	return size
}

// reserve makes room for inserts new records and bytes of record data,
// so that the puts that follow cannot fail for want of memory: a write
// of several records is then all or nothing. Set holdCompaction until
// they are done, or compaction may give the room back.
func (t *table) reserve(inserts, bytes int) error {
	if n := slotsFor(t.used+inserts, len(t.slots)); inserts > 0 && n != len(t.slots) {
		if err := t.resize(n); err != nil {
			return err
		}
	}
	if t.top+bytes > len(t.arena) {
		return t.grow(t.top + bytes)
	}
	return nil
}

// hasRoom reports whether inserts new records of bytes in all fit
// without a new mapping.
func (t *table) hasRoom(inserts, bytes int) bool {
	return (t.used+inserts)*4 <= len(t.slots)*3 && t.top+bytes <= len(t.arena)
}

// maxRecordSize bounds what a put of e under key writes, without packing
// anything: a packed key is at most its text plus, for each of its three
// segments, a type byte and a length; a packed hash at most its fields
// plus a marker byte each, and its length.
func maxRecordSize(key string, e entry) int {
	v := len(e.val)
	if e.kind == kindHash {
		v *= 2
	}
	return recVar + 2*binary.MaxVarintLen64 + 1 + len(key) + 3*(1+binary.MaxVarintLen64) + v + 2*binary.MaxVarintLen64
}

// need says what a put of e under key would take that the table does
// not have yet, for reserve: whether it adds a record, and the bytes of
// arena of a new or moved record (0 for an update in place).
func (t *table) need(key string, e entry) (insert bool, bytes int) {
	h, k := t.packKey(key)
	var stack [48]byte
	v := t.appendValue(stack[:0], e)
	size := recordSize(len(k), len(v))
	pos, found := t.find(h, k)
	if !found {
		return true, size
	}
	if _, _, _, vc := t.layout(offOf(t.slots[pos])); len(v) <= vc {
		return false, 0
	}
	return false, size
}

// del removes key's record and reports whether there was one.
func (t *table) del(key string) bool {
	h, k := t.packKey(key)
	pos, found := t.find(h, k)
	if !found {
		return false
	}
	t.removeAt(pos)
	t.tidy()
	return true
}

// alloc writes a new record at the top of the arena.
func (t *table) alloc(k, v []byte, e entry) (int, error) {
	kl, vc := len(k), len(v)
	size := recordSize(kl, vc)
	if t.top+size > len(t.arena) {
		if err := t.grow(t.top + size); err != nil {
			return 0, err
		}
	}
	off := t.top
	b := t.arena[off : off+size]
	binary.LittleEndian.PutUint64(b, uint64(e.expires))
	b[recKind] = byte(e.kind)
	p := recVar
	p += binary.PutUvarint(b[p:], uint64(kl))
	p += binary.PutUvarint(b[p:], uint64(vc))
	p += copy(b[p:], k)
	copy(b[p:], v)
	t.top += size
	return off, nil
}

// grow moves the arena to a mapping of at least need bytes.
func (t *table) grow(need int) error {
	if need > maxArena {
		return fmt.Errorf("%w: a shard's records outgrew %d bytes", store.ErrUnavailable, maxArena)
	}
	// At least twice the present size; doubling stops before it could
	// overflow an int.
	n := minArena
	for (n < need || n/2 < len(t.arena)) && n <= maxArena/2 {
		n *= 2
	}
	if n < need || n > maxArena {
		n = maxArena
	}
	return t.remapArena(n, false)
}

// remapArena moves the records to a new mapping of n bytes; compacting,
// it moves only the live ones.
func (t *table) remapArena(n int, compact bool) error {
	m, err := mapBytes(n)
	if err != nil {
		return fmt.Errorf("%w: %w", store.ErrUnavailable, err)
	}
	if compact {
		top := 0
		for i, s := range t.slots {
			if s == 0 {
				continue
			}
			off := offOf(s)
			size := t.sizeAt(off)
			copy(m[top:], t.arena[off:off+size])
			t.slots[i] = slotOf(hashOf(s), top)
			top += size
		}
		t.top, t.dead = top, 0
	} else {
		copy(m, t.arena[:t.top])
	}
	unmapBytes(t.arena)
	t.arena = m
	return nil
}

// resize moves the index to n slots (a power of two).
func (t *table) resize(n int) error {
	ns, err := mapSlots(n)
	if err != nil {
		return fmt.Errorf("%w: %w", store.ErrUnavailable, err)
	}
	mask := n - 1
	for _, s := range t.slots {
		if s == 0 {
			continue
		}
		i := int(hashOf(s)) & mask
		for ns[i] != 0 {
			i = (i + 1) & mask
		}
		ns[i] = s
	}
	unmapSlots(t.slots)
	t.slots = ns
	return nil
}

// removeAt empties slot pos and shifts back the records after it that
// probed past it, so that no lookup meets a hole before its record.
func (t *table) removeAt(pos int) {
	t.dead += t.sizeAt(offOf(t.slots[pos]))
	t.used--
	mask := len(t.slots) - 1
	i := pos
	for {
		t.slots[i] = 0
		j := i
		for {
			j = (j + 1) & mask
			s := t.slots[j]
			if s == 0 {
				return
			}
			home := int(hashOf(s)) & mask
			// s may move to i unless its home lies cyclically in (i, j].
			if i <= j && (home <= i || home > j) || i > j && home <= i && home > j {
				t.slots[i] = s
				i = j
				break
			}
		}
	}
}

// tidy gives back memory after deletions: a sparse index is halved, a
// quarter-dead arena compacted. Failing to map memory for it only means
// keeping the larger mapping.
func (t *table) tidy() {
	if len(t.slots) > minSlots && t.used*8 < len(t.slots) {
		n := minSlots
		for n*3 < t.used*8 {
			n *= 2
		}
		_ = t.resize(n)
	}
	t.maybeCompact()
}

func (t *table) maybeCompact() {
	if t.scanning > 0 || t.dead < compactMin || t.dead*4 < t.top {
		return
	}
	live := t.top - t.dead
	_ = t.remapArena(max(minArena, live+live/2), true)
}

// sweep removes the records expired at now and reports how many.
func (t *table) sweep(now int64) int {
	removed := 0
	for i := 0; i < len(t.slots); {
		s := t.slots[i]
		if s != 0 {
			if exp := t.expiresAt(offOf(s)); exp != 0 && now >= exp {
				// Another record may shift into i: look at it again.
				t.removeAt(i)
				removed++
				continue
			}
		}
		i++
	}
	if removed > 0 {
		t.tidy()
	}
	return removed
}

// walkFrom calls fn with the live records of at most n records of the
// arena from offset off, and returns the offset to go on from (t.top or
// more when the walk is done). Offsets stay valid across lock holds while
// t.scanning keeps compaction away: records are only ever appended, and a
// record that was replaced or removed is dead, told by the index no
// longer pointing at it. buf is scratch for the key.
func (t *table) walkFrom(off, n int, buf []byte, fn func(key []byte, expires int64)) (int, []byte) {
	for ; off < t.top && n > 0; n-- {
		size := t.sizeAt(off)
		packed := t.keyAt(off)
		buf = t.codec.appendKey(buf[:0], packed)
		h := uint32(maphash.Bytes(t.seed, buf) >> 32)
		if pos, found := t.find(h, packed); found && offOf(t.slots[pos]) == off {
			fn(buf, t.expiresAt(off))
		}
		off += size
	}
	return off, buf
}

// all calls fn with every record's packed key (valid during the call
// only), its expiry, and a function decoding its entry.
func (t *table) all(fn func(packed []byte, expires int64, entry func() entry)) {
	for _, s := range t.slots {
		if s != 0 {
			off := offOf(s)
			fn(t.keyAt(off), t.expiresAt(off), func() entry { return t.entryAt(off) })
		}
	}
}

// free unmaps everything; the table is then empty and usable again.
func (t *table) free() {
	unmapSlots(t.slots)
	unmapBytes(t.arena)
	t.slots, t.arena = nil, nil
	t.used, t.top, t.dead = 0, 0, 0
}

func mapSlots(n int) ([]uint64, error) {
	b, err := mapBytes(n * 8)
	if err != nil {
		return nil, err
	}
	// Mappings are page-aligned, so the bytes are aligned for uint64s.
	return unsafe.Slice((*uint64)(unsafe.Pointer(unsafe.SliceData(b))), n), nil
}

func unmapSlots(s []uint64) {
	if len(s) > 0 {
		unmapBytes(unsafe.Slice((*byte)(unsafe.Pointer(unsafe.SliceData(s))), len(s)*8))
	}
}
