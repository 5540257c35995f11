package memory

import (
	"bytes"
	"hash/maphash"
	"math/rand/v2"
	"strconv"
	"strings"
	"testing"

	"github.com/policyd-mail/policyd/store"
)

func TestKeyPacking(t *testing.T) {
	c := newKeyCodec()
	for _, tc := range []struct {
		key     string
		maxSize int // 0: no bound checked
	}{
		{store.Key("192.0.2.1", "connection_shaper", "sessions"), 8},
		{store.Key("10.0.0.0/8", "client_stats", "10.1.2.3/32"), 14},
		{store.Key("2001:db8:1:2::/64", "deny_repeat_offenders", "offender"), 21},
		{store.Key("2001:db8::1", "r", "2001:db8::/32"), 0},
		{store.Key("::ffff:192.0.2.1", "r", "x"), 0},
		{store.Key("any", "greylisting:1", "triplet:0123456789abcdef0123456789abcdef"), 0},
		// Text that looks like an address but would print differently
		// stays text, so it unpacks to itself.
		{store.Key("010.0.0.1", "r", "x"), 0},
		{store.Key("192.0.2.1", "r", "192.0.2.1/24"), 0},
		{store.Key("2001:DB8::1", "r", "2001:0db8::1"), 0},
		{store.Key("fe80::1%eth0", "r", "x"), 0},
		{store.Key("1.2.3.4", "r", ""), 0},
		{store.Key("1.2.3.04", "r", "1.2.3.4/032"), 0},
		{store.Key("256.1.1.1", "r", "1.2.3.4/33"), 0},
		{store.Key("0.0.0.0", "r", "0.0.0.0/0"), 0},
		{store.Key("1.2.3.4/", "r", "1.2.3.4/8/8"), 0},
		{store.Key("1.2.3", "r", "1.2.3.4.5"), 0},
		{store.Key("1.2.3.4567", "r", "01.2.3.4"), 0},
		{store.Key("a", "", "b"), 0},
		// Not the usual shape: kept as they are.
		{"", 0},
		{"a", 0},
		{"policyd:{}:r:x", 0},
		{"policyd:{a}:r", 0},
		{"policyd:{a}b}:r:x", 0},
		{"policyd:{{a}:r:x", 0},
		{"policyd:{a}:r:x:y:z", 0},
		{"{tag}rest", 0},
		{"policyd:{\x00\xff}:\x80:\xfe", 0},
	} {
		t.Run(strconv.Quote(tc.key), func(t *testing.T) {
			p := c.pack(nil, tc.key)
			if got := c.unpack(p); got != tc.key {
				t.Errorf("unpack(pack(%q)) = %q", tc.key, got)
			}
			if again := c.pack(nil, tc.key); !bytes.Equal(again, p) {
				t.Errorf("packing twice differs: %x then %x", p, again)
			}
			if tc.maxSize > 0 && len(p) > tc.maxSize {
				t.Errorf("packed into %d bytes, want at most %d", len(p), tc.maxSize)
			}
		})
	}
}

// A full dictionary leaves new words as text, and words already in it
// keep packing the same way.
func TestKeyPackingDictionaryFull(t *testing.T) {
	c := newKeyCodec()
	first := store.Key("192.0.2.1", "early", "sessions")
	packed := c.pack(nil, first)
	for i := range maxWords + 10 {
		k := store.Key("192.0.2.1", "rule"+strconv.Itoa(i), "w")
		if got := c.unpack(c.pack(nil, k)); got != k {
			t.Fatalf("unpack(pack(%q)) = %q", k, got)
		}
	}
	if got := len(*c.ids.Load()); got != maxWords {
		t.Errorf("dictionary holds %d words, want %d", got, maxWords)
	}
	if again := c.pack(nil, first); !bytes.Equal(again, packed) {
		t.Errorf("a key packed before the dictionary filled packs differently after: %x, %x", packed, again)
	}
}

func FuzzKeyPacking(f *testing.F) {
	f.Add(store.Key("192.0.2.1", "r", "x"))
	f.Add(store.Key("10.0.0.0/8", "client_stats", "10.1.2.0/24"))
	f.Add("policyd:{::1}:a:b:c")
	f.Add(store.Key("255.255.255.255/32", "r", "1.2.3.4/0"))
	f.Fuzz(func(t *testing.T, key string) {
		c := newKeyCodec()
		if got := c.unpack(c.pack(nil, key)); got != key {
			t.Errorf("unpack(pack(%q)) = %q", key, got)
		}
	})
}

// The table against a Go map doing the same random operations: values
// growing and shrinking (records moved, compaction), many inserts and
// deletes (index growth, shrinking, back-shifting), expiry.
func TestTableMatchesMap(t *testing.T) {
	for _, seed := range []uint64{1, 2, 3} {
		t.Run(strconv.FormatUint(seed, 10), func(t *testing.T) {
			tab := &table{codec: newKeyCodec(), seed: maphash.MakeSeed()}
			defer tab.free()
			model := map[string]entry{}
			rng := rand.New(rand.NewPCG(seed, 99))
			keyOf := func() string {
				i := rng.IntN(5000)
				switch i % 3 {
				case 0:
					return store.Key("10.0."+strconv.Itoa(i/256)+"."+strconv.Itoa(i%256), "r", "sessions")
				case 1:
					return store.Key("any", "g", "triplet:"+strconv.Itoa(i))
				}
				return "raw-" + strconv.Itoa(i)
			}
			var now int64 = 1000
			for step := range 200_000 {
				k := keyOf()
				switch op := rng.IntN(10); {
				case op < 5:
					e := entry{expires: now + rng.Int64N(500)}
					switch rng.IntN(3) {
					case 0:
						e.kind, e.n = kindInt, rng.Int64N(1<<40)
					case 1:
						// Field names interned and not (too long).
						fields := map[string]int64{}
						for range rng.IntN(4) {
							name := []string{"success", "permfail", "count", "last", strings.Repeat("long", 8)}[rng.IntN(5)]
							fields[name] = rng.Int64N(1<<50) - 1<<49
						}
						e.kind, e.val = kindHash, fieldsFromMap(fields)
					default:
						e.kind, e.val = kindLeases, strings.Repeat("x", rng.IntN(60))
					}
					if err := tab.put(k, e); err != nil {
						t.Fatal(err)
					}
					model[k] = e
				case op < 7:
					_, inModel := model[k]
					if got := tab.del(k); got != inModel {
						t.Fatalf("step %d: del(%q) = %v, want %v", step, k, got, inModel)
					}
					delete(model, k)
				case op < 9:
					got, ok := tab.get(k)
					want, inModel := model[k]
					if ok != inModel || got != want {
						t.Fatalf("step %d: get(%q) = %+v, %v; want %+v, %v", step, k, got, ok, want, inModel)
					}
				default:
					now += 10
					tab.sweep(now)
					for mk, e := range model {
						if e.expired(now) {
							delete(model, mk)
						}
					}
				}
				if tab.len() != len(model) {
					t.Fatalf("step %d: len = %d, want %d", step, tab.len(), len(model))
				}
			}
			seen := 0
			tab.all(func(packed []byte, e entry) {
				seen++
				k := tab.codec.unpack(packed)
				if want, ok := model[k]; !ok || want != e {
					t.Errorf("all: %q = %+v, model has %+v, %v", k, e, want, ok)
				}
			})
			if seen != len(model) {
				t.Errorf("all visited %d records, want %d", seen, len(model))
			}
			if tab.dead*4 >= tab.top && tab.dead >= compactMin {
				t.Errorf("arena %d bytes with %d dead: compaction did not run", tab.top, tab.dead)
			}
		})
	}
}

// BenchmarkTablePut is an in-place counter update, the commonest write.
func BenchmarkTablePut(b *testing.B) {
	tab := &table{codec: newKeyCodec(), seed: maphash.MakeSeed()}
	defer tab.free()
	keys := make([]string, 1<<16)
	for i := range keys {
		keys[i] = store.Key("10.0."+strconv.Itoa(i>>8)+"."+strconv.Itoa(i&255), "connection_shaper", "sessions")
		if err := tab.put(keys[i], entry{kind: kindInt, n: 1}); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		if err := tab.put(keys[i&(len(keys)-1)], entry{kind: kindInt, n: int64(i)}); err != nil {
			b.Fatal(err)
		}
		i++
	}
}
