package hostsallow_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/policyd-mail/policyd/rules"
	_ "github.com/policyd-mail/policyd/rules/hosts_allow"
	"github.com/policyd-mail/policyd/rules/rulestest"
	_ "github.com/policyd-mail/policyd/rules/whitelist"
)

// op is one step of a scenario: open a session (named, from ip), close
// one, let a session run a later hook, or move the clock.
type op struct {
	open    string // session name to open
	ip      string
	close   string // session name to end
	mail    string // session name that sends MAIL FROM
	advance time.Duration
	want    rules.Code // for open
}

func TestHostsAllow(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name    string
		plugins string
		file    string
		ops     []op
	}{
		{
			name:    "three sessions open, the fourth is refused; closing one lets the next in",
			plugins: "hosts_allow max_conn_ip 3",
			ops: []op{
				{open: "a", ip: "192.0.2.1", want: rules.Declined},
				{open: "b", ip: "192.0.2.1", want: rules.Declined},
				{open: "c", ip: "192.0.2.1", want: rules.Declined},
				{open: "d", ip: "192.0.2.1", want: rules.DenySoftDisconnect},
				{open: "x", ip: "192.0.2.2", want: rules.Declined},
				{close: "d"}, // a refused session holds nothing
				{open: "e", ip: "192.0.2.1", want: rules.DenySoftDisconnect},
				{close: "b"},
				{open: "f", ip: "192.0.2.1", want: rules.Declined},
				{open: "g", ip: "192.0.2.1", want: rules.DenySoftDisconnect},
			},
		},
		{
			name:    "a crashed policyd's slots free themselves when the lease runs out",
			plugins: "hosts_allow max_conn_ip 2 lease 60",
			ops: []op{
				{open: "a", ip: "192.0.2.1", want: rules.Declined},
				{open: "b", ip: "192.0.2.1", want: rules.Declined}, // never closed: the process died
				{advance: 59 * time.Second},
				{open: "c", ip: "192.0.2.1", want: rules.DenySoftDisconnect},
				{advance: time.Second}, // exactly the lease: expired
				{open: "d", ip: "192.0.2.1", want: rules.Declined},
				{open: "e", ip: "192.0.2.1", want: rules.Declined},
				{open: "f", ip: "192.0.2.1", want: rules.DenySoftDisconnect},
			},
		},
		{
			name:    "a live session renews its lease at a later hook",
			plugins: "hosts_allow max_conn_ip 1 lease 60",
			ops: []op{
				{open: "a", ip: "192.0.2.1", want: rules.Declined},
				{advance: 14 * time.Second},
				{mail: "a"}, // under a quarter of the lease: no renewal
				{advance: 46 * time.Second},
				{open: "b", ip: "192.0.2.1", want: rules.Declined}, // a's lease ran out
				{close: "b"},
				{mail: "a"}, // re-granted: the slot was free
				{advance: 15 * time.Second},
				{mail: "a"}, // a quarter passed: renewed until +75s
				{advance: 50 * time.Second},
				{open: "c", ip: "192.0.2.1", want: rules.DenySoftDisconnect},
				{close: "a"},
				{open: "d", ip: "192.0.2.1", want: rules.Declined},
			},
		},
		{
			name:    "whitelisted clients are not counted",
			plugins: "whitelist clients 198.51.100.0/24\nhosts_allow max_conn_ip 1 whitelist 203.0.113.5",
			ops: []op{
				{open: "a", ip: "198.51.100.1", want: rules.Declined},
				{open: "b", ip: "198.51.100.1", want: rules.Declined},
				{open: "c", ip: "203.0.113.5", want: rules.Declined},
				{open: "d", ip: "203.0.113.5", want: rules.Declined},
				{open: "e", ip: "203.0.113.6", want: rules.Declined},
				{open: "f", ip: "203.0.113.6", want: rules.DenySoftDisconnect},
			},
		},
		{
			name:    "IPv6 clients share slots per /64; IPv4-mapped is IPv4",
			plugins: "hosts_allow max_conn_ip 2",
			ops: []op{
				{open: "a", ip: "2001:db8:1:2::1", want: rules.Declined},
				{open: "b", ip: "2001:db8:1:2::2", want: rules.Declined},
				{open: "c", ip: "2001:db8:1:2:ffff::3", want: rules.DenySoftDisconnect},
				{open: "d", ip: "2001:db8:1:3::1", want: rules.Declined},
				{open: "e", ip: "::ffff:192.0.2.9", want: rules.Declined},
				{open: "f", ip: "192.0.2.9", want: rules.Declined},
				{open: "g", ip: "192.0.2.9", want: rules.DenySoftDisconnect},
			},
		},
		{
			name:    "the qpsmtpd list answers first and listed clients are not counted",
			plugins: "hosts_allow max_conn_ip 1",
			file:    "net 192.0.2.0/24 DENY go away\nnet 10.0.0. declined\nnet 10.0.0.0/8 DENYSOFT_DISCONNECT\n",
			ops: []op{
				{open: "a", ip: "192.0.2.1", want: rules.Deny},
				{open: "b", ip: "10.0.0.1", want: rules.Declined},
				{open: "c", ip: "10.0.0.1", want: rules.Declined},
				{open: "d", ip: "10.1.0.1", want: rules.DenySoftDisconnect},
				{open: "e", ip: "198.51.100.1", want: rules.Declined},
				{open: "f", ip: "198.51.100.1", want: rules.DenySoftDisconnect},
			},
		},
		{
			name:    "max_conn_ip 0 only applies the list",
			plugins: "hosts_allow max_conn_ip 0 net \"192.0.2.1 DENYSOFT not now\"",
			ops: []op{
				{open: "a", ip: "198.51.100.1", want: rules.Declined},
				{open: "b", ip: "198.51.100.1", want: rules.Declined},
				{open: "c", ip: "192.0.2.1", want: rules.DenySoft},
			},
		},
		{
			name:    "two instances count separately",
			plugins: "hosts_allow:0 max_conn_ip 3\nhosts_allow:1 max_conn_ip 1",
			ops: []op{
				{open: "a", ip: "192.0.2.1", want: rules.Declined},
				{open: "b", ip: "192.0.2.1", want: rules.DenySoftDisconnect},
				{close: "a"},
				{open: "c", ip: "192.0.2.1", want: rules.Declined},
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			files := map[string]string{}
			if tc.file != "" {
				files["hosts_allow"] = tc.file
			}
			h := rulestest.New(t, tc.plugins, files)
			open := map[string]*rules.Conversation{}
			for i, o := range tc.ops {
				h.Clock.Advance(o.advance)
				switch {
				case o.open != "":
					s := h.Session(o.ip)
					d := s.Connect(ctx)
					if d.Code != o.want {
						t.Fatalf("op %d: session %s from %s: got %v (%q), want %v", i+1, o.open, o.ip, d.Code, d.Text, o.want)
					}
					open[o.open] = s
				case o.close != "":
					open[o.close].End(ctx)
				case o.mail != "":
					if d := open[o.mail].Mail(ctx, rules.MailFrom{Sender: "a@example.org"}); d.Code != rules.Declined {
						t.Fatalf("op %d: MAIL answered %v", i+1, d.Code)
					}
				}
			}
		})
	}
}

func TestRefusalText(t *testing.T) {
	h := rulestest.New(t, "hosts_allow max_conn_ip 1", nil)
	ctx := context.Background()
	h.Session("192.0.2.1").Connect(ctx)
	d := h.Session("192.0.2.1").Connect(ctx)
	if got := d.Reply.String(); got != "421 4.7.0 Too many concurrent connections from your address (more than 1), please try again later" {
		t.Fatalf("reply %q", got)
	}
}

// The concurrency limit says it needs the milter front-end (the daemon
// and check say so when the milter listener is off); without a limit it
// needs nothing.
func TestNeedsMilter(t *testing.T) {
	h := rulestest.New(t, "hosts_allow", nil)
	if why := h.Chain.NeedsMilter()["hosts_allow"]; !strings.Contains(why, "needs the milter front-end") {
		t.Fatalf("NeedsMilter = %q", why)
	}
	h = rulestest.New(t, "hosts_allow max_conn_ip 0", nil)
	if n := h.Chain.NeedsMilter(); len(n) != 0 {
		t.Fatalf("needs the milter without a limit: %v", n)
	}
}

func TestConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		plugins, file, want string
	}{
		{"hosts_allow", "net 192.0.2.0/24\n", `config/plugins:1: hosts_allow: net "192.0.2.0/24": want "network CODE [text]"`},
		{"hosts_allow", "net 192.0.2.0/24 MAYBE\n", `config/plugins:1: hosts_allow: net "192.0.2.0/24 MAYBE": "MAYBE" is not a return code`},
		{"hosts_allow", "net 300.0.0.0/8 DENY\n", `config/plugins:1: hosts_allow: net "300.0.0.0/8 DENY": "300.0.0.0/8" is not a network`},
		{"hosts_allow", "lease 5\n", "config/hosts_allow:1: hosts_allow: lease: 5s is out of range"},
		{"hosts_allow max_conn_ip -1", "", "config/plugins:1: hosts_allow: max_conn_ip: -1 is out of range"},
		{"hosts_allow", "192.0.2.0/24 DENY go away\n", `config/hosts_allow:1: hosts_allow: unknown key "192.0.2.0/24"`},
	} {
		_, err := load(tc.plugins, tc.file)
		var ce rules.ConfigErrors
		if !errors.As(err, &ce) || !strings.HasPrefix(ce.Error(), tc.want) {
			t.Errorf("%q + %q: error %v\nwant prefix %s", tc.plugins, tc.file, err, tc.want)
		}
	}
}

func load(plugins, file string) (*rules.Chain, error) {
	fsys := fstest.MapFS{"plugins": {Data: []byte(plugins + "\n")}}
	if file != "" {
		fsys["hosts_allow"] = &fstest.MapFile{Data: []byte(file)}
	}
	c, _, err := rules.Load(fsys, "config", rules.Options{})
	return c, err
}
