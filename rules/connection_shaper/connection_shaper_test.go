package connectionshaper_test

import (
	"strings"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/rules"
	_ "github.com/policyd-mail/policyd/rules/connection_shaper"
	"github.com/policyd-mail/policyd/rules/rulestest"
	_ "github.com/policyd-mail/policyd/rules/whitelist"
)

// step is one session opened at an offset from the previous step.
type step struct {
	ip    string
	after time.Duration
	want  rules.Code
}

func TestConnectionShaper(t *testing.T) {
	tests := []struct {
		name    string
		plugins string
		file    string
		steps   []step
	}{
		{
			name:    "threshold 3: the fourth session in the window is refused",
			plugins: "connection_shaper threshold 3",
			steps: []step{
				{ip: "192.0.2.1", want: rules.Declined},
				{ip: "192.0.2.1", want: rules.Declined},
				{ip: "192.0.2.1", want: rules.Declined},
				{ip: "192.0.2.1", want: rules.DenySoft},
				{ip: "192.0.2.2", want: rules.Declined},
			},
		},
		{
			name:    "the window is fixed from the first session, then starts over",
			plugins: "connection_shaper threshold 2 exptime 60",
			steps: []step{
				{ip: "192.0.2.1", want: rules.Declined},
				{ip: "192.0.2.1", after: 50 * time.Second, want: rules.Declined},
				{ip: "192.0.2.1", after: 5 * time.Second, want: rules.DenySoft},
				{ip: "192.0.2.1", after: 6 * time.Second, want: rules.Declined},
			},
		},
		{
			name:    "seed config file with memcached keys and dotted whitelist",
			plugins: "connection_shaper",
			file:    "exptime 60\nthreshold 1\nmemcached_port 11211\nmemcached_server memcached.example.com\nwhitelist 192.168.1., 192.168.2., 10.0.0\n",
			steps: []step{
				{ip: "192.168.1.7", want: rules.Declined},
				{ip: "192.168.1.7", want: rules.Declined},
				{ip: "10.0.0.9", want: rules.Declined},
				{ip: "10.0.0.9", want: rules.Declined},
				{ip: "10.0.1.9", want: rules.Declined},
				{ip: "10.0.1.9", want: rules.DenySoft},
			},
		},
		{
			name:    "whitelist rule before the shaper exempts the client",
			plugins: "whitelist clients 198.51.100.0/24\nconnection_shaper threshold 1",
			steps: []step{
				{ip: "198.51.100.3", want: rules.Declined},
				{ip: "198.51.100.3", want: rules.Declined},
				{ip: "203.0.113.3", want: rules.Declined},
				{ip: "203.0.113.3", want: rules.DenySoft},
			},
		},
		{
			name:    "IPv6 clients share one counter per /64",
			plugins: "connection_shaper threshold 2",
			steps: []step{
				{ip: "2001:db8:1:2::1", want: rules.Declined},
				{ip: "2001:db8:1:2::ffff", want: rules.Declined},
				{ip: "2001:db8:1:2:aaaa::5", want: rules.DenySoft},
				{ip: "2001:db8:1:3::1", want: rules.Declined},
			},
		},
		{
			name:    "ipv6_prefix 128 counts each address",
			plugins: "connection_shaper threshold 1 ipv6_prefix 128",
			steps: []step{
				{ip: "2001:db8::1", want: rules.Declined},
				{ip: "2001:db8::2", want: rules.Declined},
				{ip: "2001:db8::1", want: rules.DenySoft},
			},
		},
		{
			name:    "IPv4-mapped IPv6 is the IPv4 client",
			plugins: "connection_shaper threshold 1",
			steps: []step{
				{ip: "::ffff:192.0.2.9", want: rules.Declined},
				{ip: "192.0.2.9", want: rules.DenySoft},
			},
		},
		{
			name:    "two instances keep separate counters",
			plugins: "connection_shaper:0 threshold 5\nconnection_shaper:1 threshold 2",
			steps: []step{
				{ip: "192.0.2.1", want: rules.Declined},
				{ip: "192.0.2.1", want: rules.Declined},
				{ip: "192.0.2.1", want: rules.DenySoft},
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			files := map[string]string{}
			if tc.file != "" {
				files["connection_shaper"] = tc.file
			}
			h := rulestest.New(t, tc.plugins, files)
			for i, st := range tc.steps {
				h.Clock.Advance(st.after)
				_, d := h.Connect(st.ip)
				if d.Code != st.want {
					t.Fatalf("step %d (%s): got %v (%q), want %v", i+1, st.ip, d.Code, d.Text, st.want)
				}
				if d.Code == rules.DenySoft && (d.Reply.Code != 450 || d.Reply.Enhanced != "4.7.1" || !strings.Contains(d.Text, "Too many connections")) {
					t.Fatalf("step %d: reply %q", i+1, d.Reply)
				}
			}
		})
	}
}

func TestSeedMemcachedKeysWarn(t *testing.T) {
	h := rulestest.New(t, "connection_shaper", map[string]string{"connection_shaper": "memcached_server localhost\n"})
	if len(h.Warns) != 1 || !strings.Contains(h.Warns[0].Error(), "config/connection_shaper:1: warning: connection_shaper: memcached_server is ignored") {
		t.Fatalf("warnings: %v", h.Warns)
	}
}

func BenchmarkConnect(b *testing.B) {
	h := rulestest.New(b, "whitelist clients 127.0.0.0/8\nconnection_shaper threshold 1000000000", nil)
	s := h.Session("192.0.2.1")
	b.ReportAllocs()
	for b.Loop() {
		h.Run(rules.HookConnect, s)
	}
}
