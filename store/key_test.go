package store

import (
	"math/rand/v2"
	"net/netip"
	"strings"
	"testing"
)

// randomText is what a client may send as a login, a sender or a
// script's key: any bytes, the grammar's own punctuation and IPv6 text
// included.
func randomText(r *rand.Rand) string {
	const special = ":{}=%@.+-_/ \x00\xff"
	n := r.IntN(40)
	b := make([]byte, n)
	for i := range b {
		switch r.IntN(4) {
		case 0:
			b[i] = special[r.IntN(len(special))]
		case 1:
			b[i] = byte(r.IntN(256))
		default:
			b[i] = "abcdefghijklmnopqrstuvwxyz0123456789"[r.IntN(36)]
		}
	}
	switch r.IntN(6) {
	case 0: // a sender
		return string(b) + "@" + "example.org"
	case 1: // an IPv6 address as text
		var a [16]byte
		for i := range a {
			a[i] = byte(r.IntN(256))
		}
		return netip.AddrFrom16(a).String()
	case 2: // a word, as a rule's own would be
		return "sessions"
	}
	return string(b)
}

func randomAddr(r *rand.Rand) netip.Addr {
	if r.IntN(2) == 0 {
		return netip.AddrFrom4([4]byte{byte(r.IntN(256)), byte(r.IntN(256)), byte(r.IntN(256)), byte(r.IntN(256))})
	}
	var a [16]byte
	for i := range a {
		a[i] = byte(r.IntN(256))
	}
	return netip.AddrFrom16(a)
}

// The key contract: every key kind, fed 100 000 random senders, logins
// and addresses, gives a key that ParseKey takes apart into what went in
// and back into the same text; user text never becomes a word and never
// leaves its segment or the hash tag.
func TestKeyGrammarContract(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	rules := []Keys{NewKeys("ratelimit", 64), NewKeys("ratelimit:3", 48), NewKeys("client_stats:12", 64), NewKeys("lua_script", 128)}
	for i := range 100_000 {
		k := rules[i%len(rules)]
		a, text, text2 := randomAddr(r), randomText(r), randomText(r)
		n, _ := a.Prefix(r.IntN(a.BitLen() + 1))
		type want struct {
			tag   SegKind
			text  string // a value's text, in the tag or the first segment
			about netip.Prefix
			segs  int
		}
		cases := []struct {
			key string
			want
		}{
			{k.Client(a, "sessions"), want{SegNet, "", ClientNet(a, k.IPv6Prefix()), 1}},
			{k.Net(n, ClientNet(a, 64), "n"), want{SegNet, "", ClientNet(a, 64), 2}},
			{k.Under(n, "triplet", "0a1b2c"), want{SegNet, "", n, 2}},
			{k.Any("triplet", "00ff"), want{SegAny, "", netip.Prefix{}, 2}},
			{k.Value("sasl_username", text, "messages"), want{SegValue, text, netip.Prefix{}, 1}},
			{k.Value("sender", text, ValueSeg("recipient_domain", text2), "recipients"), want{SegValue, text, netip.Prefix{}, 2}},
			{k.Client(a, "own", ValueSeg("key", text)), want{SegNet, "", ClientNet(a, k.IPv6Prefix()), 2}},
		}
		for _, tc := range cases {
			p, ok := ParseKey(tc.key)
			if !ok {
				t.Fatalf("ParseKey(%q) failed", tc.key)
			}
			if p.String() != tc.key {
				t.Fatalf("ParseKey(%q).String() = %q", tc.key, p.String())
			}
			if p.Rule() != k.Rule() || p.Tag.Kind != tc.tag || len(p.Segs) != tc.segs {
				t.Fatalf("ParseKey(%q) = rule %q tag %d, %d segments", tc.key, p.Rule(), p.Tag.Kind, len(p.Segs))
			}
			if tc.tag == SegValue && p.Tag.Text != tc.text {
				t.Fatalf("ParseKey(%q): value %q, want %q", tc.key, p.Tag.Text, tc.text)
			}
			if about, ok := p.About(); ok != tc.about.IsValid() || ok && about != tc.about {
				t.Fatalf("ParseKey(%q).About() = %v %v, want %v", tc.key, about, ok, tc.about)
			}
			// The hash tag is the whole of the TAG, whatever the text.
			if tag := HashTag(tc.key); tag != p.Tag.Raw() {
				t.Fatalf("HashTag(%q) = %q, want %q", tc.key, tag, p.Tag.Raw())
			}
			for _, s := range append([]Seg{p.Tag}, p.Segs...) {
				if s.Kind == SegWord && s.Word != "sessions" && s.Word != "n" && s.Word != "triplet" && s.Word != "messages" && s.Word != "recipients" && s.Word != "own" {
					t.Fatalf("ParseKey(%q): %q is a word, and no rule wrote it", tc.key, s.Word)
				}
			}
		}
	}
}

func TestParseKeyRejects(t *testing.T) {
	for _, k := range []string{
		"",
		"policyd:",
		"policyd:{}:r:x",
		"policyd:{192.0.2.1}:r",     // no record
		"policyd:{192.0.2.1}:R:x",   // not a rule name
		"policyd:{192.0.2.1}:r:12",  // a number first reads as N
		"policyd:{192.0.2.1}:r:1:2", // and after N too
		"policyd:{192.0.2.01}:r:x",  // not how netip prints it
		"policyd:{192.0.2.1/32}:r:@1.2.3.4/33",
		"policyd:{2001:DB8::1}:r:x",     // upper case
		"policyd:{fe80::1%eth0}:r:x",    // zone
		"policyd:{a=b}c}:r:x",           // a brace in the tag
		"policyd:{sender=a%3a}:r:x",     // lower-case escape
		"policyd:{sender=a%41}:r:x",     // an escape of a safe byte
		"policyd:{sender=a%4}:r:x",      // torn escape
		"policyd:{sender=a b}:r:x",      // an unescaped space
		"policyd:{any}:r:x::y",          // an empty segment
		"policyd:{any}:r:@10.0.0.0/8:x", // @NET not last
		"policyd:{any}:r:x:" + strings.Repeat("a", maxWord+1) + "=1", // a value's attribute must be a word
		"other:{192.0.2.1}:r:x",
	} {
		if p, ok := ParseKey(k); ok {
			t.Errorf("ParseKey(%q) = %+v, want no parse", k, p)
		}
	}
}

func TestEscape(t *testing.T) {
	for in, want := range map[string]string{
		"alice":             "alice",
		"Alice@Example.org": "Alice@Example.org",
		"a:b{c}d=e%f":       "a%3Ab%7Bc%7Dd%3De%25f",
		"2001:db8::1":       "2001%3Adb8%3A%3A1",
		"é \x00":            "%C3%A9%20%00",
	} {
		if got := Escape(in); got != want {
			t.Errorf("Escape(%q) = %q, want %q", in, got, want)
		}
		if back, ok := unescape(want); !ok || back != in {
			t.Errorf("unescape(%q) = %q %v", want, back, ok)
		}
	}
}

// The earlier client_stats shape (a bare network after the rule) moves
// to @NET; keys of the grammar and other keys stay as they are.
func TestMigrateKey(t *testing.T) {
	for _, tc := range []struct{ in, out string }{
		{"policyd:{192.0.0.0/8}:client_stats:192.0.2.0/24", "policyd:{192.0.0.0/8}:client_stats:@192.0.2.0/24"},
		{"policyd:{192.0.0.0/8}:client_stats:192.0.2.7/32", "policyd:{192.0.0.0/8}:client_stats:@192.0.2.7/32"},
		{"policyd:{2001:db8::/32}:client_stats:2001:db8:1::/48", "policyd:{2001:db8::/32}:client_stats:@2001:db8:1::/48"},
		{"policyd:{2001:db8::/32}:client_stats:1:2001:db8:1::/48", "policyd:{2001:db8::/32}:client_stats:1:@2001:db8:1::/48"},
		{"policyd:{1::/16}:client_stats:1:1::/16", "policyd:{1::/16}:client_stats:1:@1::/16"},
		{"policyd:{192.0.0.0/8}:client_stats:2:192.0.2.0/24", "policyd:{192.0.0.0/8}:client_stats:2:@192.0.2.0/24"},
		// Unchanged: already the grammar's, or not a network inside the tag.
		{"policyd:{192.0.0.0/8}:client_stats:@192.0.2.0/24", ""},
		{"policyd:{192.0.2.1}:connection_shaper:sessions", ""},
		{"policyd:{192.0.0.0/8}:client_stats:10.0.2.0/24", ""},
		{"policyd:readyz", ""},
	} {
		got, changed := MigrateKey(tc.in)
		if want := tc.out; want == "" && (changed || got != tc.in) || want != "" && (!changed || got != want) {
			t.Errorf("MigrateKey(%q) = %q %v, want %q", tc.in, got, changed, tc.out)
		}
	}
}

func TestNewKeysRejectsBadNames(t *testing.T) {
	for _, name := range []string{"", "Rule", "r:x", "r:12345", "1r"} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("NewKeys(%q) did not panic", name)
				}
			}()
			NewKeys(name, 64)
		}()
	}
}
