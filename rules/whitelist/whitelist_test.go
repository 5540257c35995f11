package whitelist_test

import (
	"testing"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/rules/rulestest"
	_ "github.com/policyd-mail/policyd/rules/whitelist"
)

func TestWhitelist(t *testing.T) {
	h := rulestest.New(t, "whitelist", map[string]string{
		"whitelist": "# trusted relays\nclients 10.0.0.0/8, 192.168.1.\nclients 2001:db8::/32 198.51.100.7\n",
	})
	tests := []struct {
		ip   string
		want bool
	}{
		{"10.20.30.40", true},
		{"192.168.1.200", true},
		{"192.168.10.1", false},
		{"2001:db8:ffff::1", true},
		{"2001:db9::1", false},
		{"198.51.100.7", true},
		{"198.51.100.8", false},
		{"::ffff:10.0.0.1", true},
	}
	for _, tc := range tests {
		s, d := h.Connect(tc.ip)
		if d.Code != rules.Declined {
			t.Errorf("%s: whitelist answered %v; it must only set a note", tc.ip, d.Code)
		}
		if s.Whitelisted() != tc.want {
			t.Errorf("%s: whitelisted = %v, want %v", tc.ip, s.Whitelisted(), tc.want)
		}
	}
}
