package store

import (
	"strings"
	"testing"
)

func TestKey(t *testing.T) {
	for _, tc := range []struct {
		name, client, rule, what, want string
	}{
		{"typical", "192.0.2.1", "rate", "conn", "policyd:{192.0.2.1}:rate:conn"},
		{"ipv6 client keeps its colons inside the tag", "2001:db8::1", "rate", "rcpt", "policyd:{2001:db8::1}:rate:rcpt"},
		{"hostname", "mail.example.org", "greylist", "a@b.example/c@d.example", "policyd:{mail.example.org}:greylist:a@b.example/c@d.example"},
		{"empty parts keep their separators", "", "", "", "policyd:{}::"},
		{"empty what", "c", "r", "", "policyd:{c}:r:"},
		{"binary-safe", "c\x00", "r", "\xff", "policyd:{c\x00}:r:\xff"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Key(tc.client, tc.rule, tc.what)
			if got != tc.want {
				t.Errorf("Key(%q, %q, %q) = %q, want %q", tc.client, tc.rule, tc.what, got, tc.want)
			}
			if !strings.HasPrefix(got, Prefix) {
				t.Errorf("Key %q lacks Prefix %q", got, Prefix)
			}
		})
	}
}

// TestKeyAllocatesOnce guards the Grow in Key: keys are built on every rule
// evaluation, so a regrowing builder would show up in the hot path.
func TestKeyAllocatesOnce(t *testing.T) {
	allocs := testing.AllocsPerRun(100, func() {
		_ = Key("2001:db8::1", "connection_shaper", "concurrency")
	})
	if allocs != 1 {
		t.Errorf("Key: %v allocs/op, want 1", allocs)
	}
}
