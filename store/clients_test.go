package store

import (
	"net/netip"
	"testing"
)

func TestParseClientKey(t *testing.T) {
	for _, tc := range []struct {
		key, rule, about string
		ok               bool
	}{
		{"policyd:{192.0.2.1}:connection_shaper:sessions", "connection_shaper", "192.0.2.1/32", true},
		{"policyd:{192.0.2.1}:connection_shaper:3:sessions", "connection_shaper:3", "192.0.2.1/32", true},
		{"policyd:{2001:db8:1:2::/64}:deny_repeat_offenders:offender", "deny_repeat_offenders", "2001:db8:1:2::/64", true},
		{"policyd:{192.0.0.0/8}:client_stats:@192.0.2.0/24", "client_stats", "192.0.2.0/24", true},
		{"policyd:{2001:db8::/32}:client_stats:@2001:db8:1::/48", "client_stats", "2001:db8:1::/48", true},
		{"policyd:{192.0.2.0/24}:greylisting:triplet:0a1b", "greylisting", "192.0.2.0/24", true},
		{"policyd:{2001:db8::/32}:client_stats:1:@2001:db8:1::/48", "client_stats:1", "2001:db8:1::/48", true},
		{"policyd:{2001:db8::/32}:client_stats:1:@2001:db8:1:2::5/128", "client_stats:1", "2001:db8:1:2::5/128", true},
		{"policyd:{2001:db8::/32}:client_stats:@2001:db8:1:2::/64", "client_stats", "2001:db8:1:2::/64", true},
		{"policyd:{192.0.0.0/8}:client_stats:2:@192.0.2.0/24", "client_stats:2", "192.0.2.0/24", true},
		{"policyd:{any}:greylisting:triplet:0a1b", "", "", false},
		{"policyd:{sasl_username=alice}:ratelimit:messages", "", "", false},
		// The earlier client_stats shape is migrated, not parsed.
		{"policyd:{192.0.0.0/8}:client_stats:192.0.2.0/24", "", "", false},
		{"policyd:{192.0.2.1}", "", "", false},
		{"other:{192.0.2.1}:x:y", "", "", false},
	} {
		rule, about, ok := parseClientKey(tc.key)
		if ok != tc.ok || (ok && (rule != tc.rule || about.String() != tc.about)) {
			t.Errorf("parseClientKey(%q) = %q %s %v, want %q %s %v", tc.key, rule, about, ok, tc.rule, tc.about, tc.ok)
		}
	}
}

func TestScanPrefix(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"192.0.2.1/32", "policyd:{192."},
		{"10.0.0.0/8", "policyd:{10."},
		{"0.0.0.0/0", "policyd:{"},
		{"2001:db8::1/128", "policyd:{2001:"},
		{"fd12:3456::/32", "policyd:{fd12:"},
		{"::1/128", "policyd:{"},
		{"2000::/3", "policyd:{"},
	} {
		if got := scanPrefix(netip.MustParsePrefix(tc.in)); got != tc.want {
			t.Errorf("scanPrefix(%s) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestParseClient(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"192.0.2.1", "192.0.2.1/32"},
		{"192.0.2.7/24", "192.0.2.0/24"},
		{"::ffff:192.0.2.1", "192.0.2.1/32"},
		{"::ffff:192.0.2.0/120", "192.0.2.0/24"},
		{"2001:db8::1", "2001:db8::1/128"},
		{"mx.example.org", ""},
		{"192.0.2.0/33", ""},
	} {
		p, err := ParseClient(tc.in)
		if (err == nil) != (tc.want != "") || (err == nil && p.String() != tc.want) {
			t.Errorf("ParseClient(%q) = %s, %v; want %q", tc.in, p, err, tc.want)
		}
	}
}
