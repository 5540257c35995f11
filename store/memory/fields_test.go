package memory

import (
	"encoding/binary"
	"maps"
	"math"
	"testing"
)

func TestFields(t *testing.T) {
	enc := ""
	want := map[string]int64{}
	steps := []struct {
		name string
		v    int64
		del  bool
	}{
		{"permfail", 3, false},
		{"success", 1, false},
		{"permfail", 4, false},
		{"last", 1_790_000_000_123, false},
		{"neg", math.MinInt64, false},
		{"max", math.MaxInt64, false},
		{"", 7, false},
		{"success", 0, true},
		{"missing", 0, true},
		{"permfail", -1, false},
	}
	for i, st := range steps {
		if st.del {
			enc = fieldDel(enc, st.name)
			delete(want, st.name)
		} else {
			enc = fieldSet(enc, st.name, st.v)
			want[st.name] = st.v
		}
		if got := fieldsMap(enc); !maps.Equal(got, want) {
			t.Fatalf("step %d: %v, want %v", i, got, want)
		}
		if fieldCount(enc) != len(want) {
			t.Fatalf("step %d: count %d, want %d", i, fieldCount(enc), len(want))
		}
		for f, v := range want {
			if got, ok := fieldGet(enc, f); !ok || got != v {
				t.Fatalf("step %d: get %q = %d %v, want %d", i, f, got, ok, v)
			}
		}
	}
	if _, ok := fieldGet(enc, "success"); ok {
		t.Fatal("deleted field found")
	}
	if fieldsFromMap(want) != fieldsFromMap(maps.Clone(want)) {
		t.Fatal("fieldsFromMap is not deterministic")
	}
	if got := fieldsMap(fieldsFromMap(want)); !maps.Equal(got, want) {
		t.Fatalf("fieldsFromMap round trip: %v", got)
	}
	// A small record is small.
	if n := len(fieldSet("", "permfail", 3)); n != 10 {
		t.Errorf("{permfail: 3} packs into %d bytes, want 10", n)
	}
}

func TestVarintMatchesEncodingBinary(t *testing.T) {
	for _, v := range []int64{0, 1, -1, 63, -64, 64, 300, -300, math.MaxInt64, math.MinInt64, 1 << 40} {
		b := binary.AppendVarint(nil, v)
		got, n := varint(string(b))
		want, wn := binary.Varint(b)
		if got != want || n != wn {
			t.Errorf("varint(%d) = %d,%d; encoding/binary %d,%d", v, got, n, want, wn)
		}
	}
	for _, s := range []string{"", "\x80", "\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01"} {
		_, n := uvarint(s)
		_, wn := binary.Uvarint([]byte(s))
		if (n > 0) != (wn > 0) || (n > 0 && n != wn) {
			t.Errorf("uvarint(%q) n=%d, encoding/binary %d", s, n, wn)
		}
	}
	// A truncated record ends the iteration instead of reading past it.
	enc := fieldSet("", "count", 5)
	if n := fieldCount(enc[:len(enc)-1] + "\x80"); n != 0 {
		t.Errorf("truncated record yields %d fields", n)
	}
}
