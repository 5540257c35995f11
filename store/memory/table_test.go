package memory

import (
	"bytes"
	"errors"
	"hash/maphash"
	"math/rand/v2"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/store"
)

func TestKeyPacking(t *testing.T) {
	c := newKeyCodec()
	for _, tc := range []struct {
		key     string
		maxSize int // 0: no bound checked
	}{
		{store.Key("192.0.2.1", "connection_shaper", "sessions"), 8},
		{store.Key("10.0.0.0/8", "client_stats", "@10.1.2.3/32"), 14},
		{store.Key("2001:db8:1:2::/64", "deny_repeat_offenders", "offender"), 21},
		{store.Key("2001:db8::1", "r", "2001:db8::/32"), 0},
		// Numbered rule instances: the number belongs to the rule's word.
		{store.Key("10.0.0.0/8", "client_stats:1", "@10.1.2.3/32"), 14},
		{store.Key("10.0.0.0/8", "client_stats:12", "@2001:db8::/64"), 0},
		{store.Key("2001:db8::/32", "client_stats:1", "@2001:db8:1::/48"), 0},
		{store.Key("sasl_username=alice%3A%7B%7D", "ratelimit:2", "recipient_domain=example.org:messages"), 0},
		{store.Key("any", "script", "=x"), 0},
		// The earlier shape of client_stats: outside the grammar, kept raw.
		{store.Key("10.0.0.0/8", "client_stats", "10.1.2.3/32"), 0},
		{store.Key("192.0.2.1", "greylisting:3", "triplet:00ff"), 0},
		{store.Key("192.0.2.1", "r", "12345:x"), 0},
		{store.Key("192.0.2.1", "r", "1:"), 0},
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

// Keys built from clients' addresses never reach the dictionary, however
// many clients there are: only rule and record names do.
func TestKeyPackingDictionaryStaysSmall(t *testing.T) {
	c := newKeyCodec()
	for i := range 5000 {
		a := "10." + strconv.Itoa(i>>16&255) + "." + strconv.Itoa(i>>8&255) + "." + strconv.Itoa(i&255)
		for _, k := range []string{
			store.Key("10.0.0.0/8", "client_stats:1", "@"+a+"/32"),
			store.Key("10.0.0.0/8", "client_stats", "1:"+a+"/32"),
			store.Key(a, "connection_shaper", "sessions"),
			store.Key("any", "greylisting", "triplet:"+strconv.Itoa(i)),
			store.Key(a, "r", "n"+strconv.Itoa(i)),
		} {
			if got := c.unpack(c.pack(nil, k)); got != k {
				t.Fatalf("unpack(pack(%q)) = %q", k, got)
			}
		}
	}
	if words := *c.words.Load(); len(words) > 8 {
		t.Errorf("the dictionary holds %d words: %q…", len(words), words[:8])
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
			tab.all(func(packed []byte, expires int64, entry func() entry) {
				seen++
				e := entry()
				if e.expires != expires {
					t.Errorf("all: expiry %d, entry's %d", expires, e.expires)
				}
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

// withFailingMaps runs f while no memory can be mapped.
func withFailingMaps(t *testing.T, f func()) {
	t.Helper()
	failMaps.Store(true)
	defer failMaps.Store(false)
	f()
}

// When memory runs out, a write fails as unavailable (the engine then
// fails open or tempfails), and a write of several records changes none.
func TestOutOfMemoryChangesNothing(t *testing.T) {
	ctx := t.Context()
	s := New(Options{Shards: 1, SweepInterval: -1})
	defer s.Close()
	existing := store.Key("192.0.2.1", "client_stats", "192.0.2.1/32")
	if err := s.HIncr(ctx, time.Hour, store.FieldIncr{Key: existing, Field: "success", Delta: 1}); err != nil {
		t.Fatal(err)
	}
	counter := store.Key("192.0.2.1", "connection_shaper", "sessions")
	if _, err := s.Incr(ctx, counter, 1, 0); err != nil {
		t.Fatal(err)
	}
	// Fill the index to its load limit: the next new record needs a
	// bigger one.
	for i := 1; s.Len()+1 <= minSlots*3/4; i++ {
		if err := s.Set(ctx, store.Key("198.51.100."+strconv.Itoa(i), "r", "x"), []byte("v"), 0); err != nil {
			t.Fatal(err)
		}
	}
	fresh := store.Key("192.0.2.1", "client_stats", "192.0.2.0/24")
	withFailingMaps(t, func() {
		err := s.HIncr(ctx, time.Hour,
			store.FieldIncr{Key: existing, Field: "success", Delta: 1},
			store.FieldIncr{Key: fresh, Field: "success", Delta: 1})
		if !errors.Is(err, store.ErrUnavailable) {
			t.Fatalf("HIncr without memory: %v, want ErrUnavailable", err)
		}
		if _, err := s.Incr(ctx, store.Key("203.0.113.1", "r", "n"), 1, 0); !errors.Is(err, store.ErrUnavailable) {
			t.Fatalf("Incr of a new key without memory: %v, want ErrUnavailable", err)
		}
		got, err := s.HGet(ctx, existing, fresh)
		if err != nil {
			t.Fatal(err)
		}
		if got[0]["success"] != 1 || got[1] != nil {
			t.Errorf("after a failed HIncr: %v, want the first record unchanged and no second", got)
		}
		// Updates in place need no memory.
		if n, err := s.Incr(ctx, counter, 1, 0); err != nil || n != 2 {
			t.Errorf("Incr of a counter in place without memory: %d, %v; want 2", n, err)
		}
		if err := s.HIncr(ctx, time.Hour, store.FieldIncr{Key: existing, Field: "success", Delta: 1}); err != nil {
			t.Errorf("HIncr of a record in place without memory: %v", err)
		}
	})
	if err := s.HIncr(ctx, time.Hour, store.FieldIncr{Key: existing, Field: "success", Delta: 1}, store.FieldIncr{Key: fresh, Field: "success", Delta: 1}); err != nil {
		t.Fatalf("HIncr once memory is back: %v", err)
	}
}

// A state directory that cannot be loaded for want of memory stops
// Open with an error, and its files are kept whole for the next start.
func TestOutOfMemoryAtStartKeepsState(t *testing.T) {
	dir := t.TempDir()
	ctx := t.Context()
	s := openT(t, Options{Dir: dir, SweepInterval: -1})
	key := store.Key("192.0.2.1", "deny_repeat_offenders", "offender")
	if _, err := s.Tally(ctx, key, time.Now(), time.Hour, time.Hour); err != nil {
		t.Fatal(err)
	}
	s.Close()
	withFailingMaps(t, func() {
		if s, err := Open(Options{Dir: dir, SweepInterval: -1}); err == nil {
			s.Close()
			t.Fatal("Open without memory succeeded")
		} else if !strings.Contains(err.Error(), "loading state") {
			t.Errorf("Open without memory: %v", err)
		}
	})
	s = openT(t, Options{Dir: dir, SweepInterval: -1})
	defer s.Close()
	if got, _ := s.HGet(ctx, key); got[0][store.TallyCount] != 1 {
		t.Errorf("offender record after the failed start: %v", got)
	}
}

// Keys without a hash tag pick their shard with the same hash the table
// probes with; their slots must still spread over the whole index.
func TestUntaggedKeysSpread(t *testing.T) {
	s := New(Options{SweepInterval: -1})
	defer s.Close()
	for i := range 50_000 {
		if err := s.Set(t.Context(), "untagged-"+strconv.Itoa(i), []byte("v"), 0); err != nil {
			t.Fatal(err)
		}
	}
	var dist, n int
	for i := range s.shards {
		tab := &s.shards[i].t
		mask := len(tab.slots) - 1
		for j, sl := range tab.slots {
			if sl != 0 {
				dist += (j - int(hashOf(sl))&mask) & mask
				n++
			}
		}
	}
	if avg := float64(dist) / float64(n); avg > 2 {
		t.Errorf("records sit %.1f slots past their home on average, want about 1 at this load", avg)
	}
}

// User text in keys (logins, senders, a script's own keys, IPv6 text)
// never enters the dictionary: after 100 000 of them the rules' words
// are still interned, and every key unpacks to itself.
func TestKeyPackingUserText(t *testing.T) {
	c := newKeyCodec()
	r := rand.New(rand.NewPCG(3, 4))
	rl := store.NewKeys("ratelimit:1", 64)
	script := store.NewKeys("my_script", 64)
	text := func() string {
		b := make([]byte, r.IntN(30))
		for i := range b {
			b[i] = "abcxyz:{}=%@.0123456789 \xff"[r.IntN(25)]
		}
		return string(b)
	}
	for i := range 100_000 {
		var a [16]byte
		for j := range a {
			a[j] = byte(r.IntN(256))
		}
		v6 := netip.AddrFrom16(a)
		for _, k := range []string{
			rl.Value("sasl_username", text(), "messages"),
			rl.Value("sender", text()+"@example.org", store.ValueSeg("recipient_domain", text()), "recipients"),
			script.Client(v6, "own", store.ValueSeg("key", v6.String())),
			script.Any("own", store.ValueSeg("key", "word"+strconv.Itoa(i))),
		} {
			if got := c.unpack(c.pack(nil, k)); got != k {
				t.Fatalf("unpack(pack(%q)) = %q", k, got)
			}
		}
	}
	words := *c.words.Load()
	if len(words) > 10 {
		t.Errorf("the dictionary holds %d words: %q…", len(words), words[:10])
	}
	if p := c.pack(nil, store.NewKeys("connection_shaper", 64).Client(netip.MustParseAddr("192.0.2.1"), "sessions")); len(p) > 8 {
		t.Errorf("a connection_shaper key packs into %d bytes after the flood, want <= 8 (its words interned)", len(p))
	}
}
