package memory

import (
	"encoding/binary"
	"maps"
	"slices"
)

// A hash's fields are packed into one immutable string: for each field,
// its name's length (uvarint), the name, and its value (varint). A
// client_stats record {permfail: 3} is 10 bytes in a 16-byte allocation,
// where a Go map of one entry costs some 250 bytes: with a million
// clients in the store, that difference is most of the memory. Records
// hold a handful of fields, so a linear scan finds one faster than a map
// would, and every update writes a new string (the journal and readers
// outside the lock may still hold the old one).

// nextField reads the field at the start of enc.
func nextField(enc string) (name string, v int64, rest string, ok bool) {
	l, n := uvarint(enc)
	if n <= 0 || uint64(len(enc)-n) < l {
		return "", 0, "", false
	}
	name, enc = enc[n:n+int(l)], enc[n+int(l):]
	v, n = varint(enc)
	if n <= 0 {
		return "", 0, "", false
	}
	return name, v, enc[n:], true
}

// fieldsAll iterates over enc's fields in their stored order.
func fieldsAll(enc string) func(yield func(string, int64) bool) {
	return func(yield func(string, int64) bool) {
		for enc != "" {
			name, v, rest, ok := nextField(enc)
			if !ok || !yield(name, v) {
				return
			}
			enc = rest
		}
	}
}

func fieldGet(enc, name string) (int64, bool) {
	for f, v := range fieldsAll(enc) {
		if f == name {
			return v, true
		}
	}
	return 0, false
}

func fieldCount(enc string) int {
	n := 0
	for range fieldsAll(enc) {
		n++
	}
	return n
}

func appendField(dst []byte, name string, v int64) []byte {
	dst = binary.AppendUvarint(dst, uint64(len(name)))
	dst = append(dst, name...)
	return binary.AppendVarint(dst, v)
}

// fieldsEdit returns enc with each field passed through keep (false
// drops it; v is the value to store), then set appended if it was not
// met. It allocates the result only.
func fieldsEdit(enc string, keep func(name string, v int64) (int64, bool), set string, setV int64, hasSet bool) string {
	var stack [64]byte
	buf := stack[:0]
	for f, v := range fieldsAll(enc) {
		if hasSet && f == set {
			buf = appendField(buf, f, setV)
			hasSet = false
			continue
		}
		if keep != nil {
			var ok bool
			if v, ok = keep(f, v); !ok {
				continue
			}
		}
		buf = appendField(buf, f, v)
	}
	if hasSet {
		buf = appendField(buf, set, setV)
	}
	return string(buf)
}

func fieldSet(enc, name string, v int64) string { return fieldsEdit(enc, nil, name, v, true) }

func fieldDel(enc, name string) string {
	return fieldsEdit(enc, func(f string, v int64) (int64, bool) { return v, f != name }, "", 0, false)
}

// fieldsMap is enc as the caller's own map.
func fieldsMap(enc string) map[string]int64 {
	return maps.Collect(fieldsAll(enc))
}

// fieldsFromMap packs m, in name order so equal maps pack equal.
func fieldsFromMap(m map[string]int64) string {
	var buf []byte
	for _, f := range slices.Sorted(maps.Keys(m)) {
		buf = appendField(buf, f, m[f])
	}
	return string(buf)
}

// uvarint and varint are binary.Uvarint and binary.Varint on a string,
// so reading a field does not copy the record.
func uvarint(s string) (uint64, int) {
	var x uint64
	var shift uint
	for i := 0; i < len(s) && i < binary.MaxVarintLen64; i++ {
		b := s[i]
		if b < 0x80 {
			if i == binary.MaxVarintLen64-1 && b > 1 {
				return 0, -(i + 1)
			}
			return x | uint64(b)<<shift, i + 1
		}
		x |= uint64(b&0x7f) << shift
		shift += 7
	}
	return 0, 0
}

func varint(s string) (int64, int) {
	ux, n := uvarint(s)
	x := int64(ux >> 1)
	if ux&1 != 0 {
		x = ^x
	}
	return x, n
}
