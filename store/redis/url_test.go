package redis

import (
	"reflect"
	"strings"
	"testing"
)

func TestParseURL(t *testing.T) {
	for _, tc := range []struct {
		url  string
		want Target
	}{
		{"redis://127.0.0.1:6379/0", Target{Mode: ModeSingle, Addrs: []string{"127.0.0.1:6379"}}},
		{"redis://localhost", Target{Mode: ModeSingle, Addrs: []string{"localhost:6379"}}},
		{"redis://localhost/", Target{Mode: ModeSingle, Addrs: []string{"localhost:6379"}}},
		{"redis://h:1/15", Target{Mode: ModeSingle, Addrs: []string{"h:1"}, DB: 15}},
		{"REDIS://H:1", Target{Mode: ModeSingle, Addrs: []string{"H:1"}}},
		{"redis://user:p%40ss%2Fw@h:1/3", Target{Mode: ModeSingle, Addrs: []string{"h:1"}, DB: 3, Username: "user", Password: "p@ss/w"}},
		{"redis://:secret@h:1", Target{Mode: ModeSingle, Addrs: []string{"h:1"}, Password: "secret"}},
		{"redis://policyd@h:1", Target{Mode: ModeSingle, Addrs: []string{"h:1"}, Username: "policyd"}},
		{"redis://u:a:b@h:1", Target{Mode: ModeSingle, Addrs: []string{"h:1"}, Username: "u", Password: "a:b"}},
		{"rediss://h:6380/1", Target{Mode: ModeSingle, Addrs: []string{"h:6380"}, DB: 1, TLS: true}},
		{"redis://[::1]:6379/2", Target{Mode: ModeSingle, Addrs: []string{"[::1]:6379"}, DB: 2}},
		{"redis://[2001:db8::7]/0", Target{Mode: ModeSingle, Addrs: []string{"[2001:db8::7]:6379"}}},
		{"redis+sentinel://s1:26379,s2:26380/mymaster", Target{Mode: ModeSentinel, Addrs: []string{"s1:26379", "s2:26380"}, Master: "mymaster"}},
		{"redis+sentinel://s1,[::1]/mymaster/2", Target{Mode: ModeSentinel, Addrs: []string{"s1:26379", "[::1]:26379"}, Master: "mymaster", DB: 2}},
		{"redis+sentinel://u:p@s1:1/m/", Target{Mode: ModeSentinel, Addrs: []string{"s1:1"}, Master: "m", Username: "u", Password: "p"}},
		{"rediss+sentinel://s1:1/m", Target{Mode: ModeSentinel, Addrs: []string{"s1:1"}, Master: "m", TLS: true}},
		{"redis+cluster://n1:7000,n2:7001,n3:7002", Target{Mode: ModeCluster, Addrs: []string{"n1:7000", "n2:7001", "n3:7002"}}},
		{"redis+cluster://n1:7000/", Target{Mode: ModeCluster, Addrs: []string{"n1:7000"}}},
		{"redis+cluster://n1:7000/0", Target{Mode: ModeCluster, Addrs: []string{"n1:7000"}}},
		{"rediss+cluster://:pw@n1", Target{Mode: ModeCluster, Addrs: []string{"n1:6379"}, Password: "pw", TLS: true}},
	} {
		t.Run(tc.url, func(t *testing.T) {
			got, err := ParseURL(tc.url)
			if err != nil {
				t.Fatalf("ParseURL: %v", err)
			}
			if !reflect.DeepEqual(got, tc.want) {
				t.Fatalf("ParseURL = %+v\nwant        %+v", got, tc.want)
			}
		})
	}
}

func TestParseURLErrors(t *testing.T) {
	for _, tc := range []struct{ url, want string }{
		{"", "no scheme"},
		{"localhost:6379", "no scheme"},
		{"memory", "no scheme"},
		{"http://h:1", `unknown scheme "http"`},
		{"unix:///run/redis.sock", `unknown scheme "unix"`},
		{"redis://", "empty host"},
		{"redis:///0", "empty host"},
		{"redis://:6379", "empty host name"},
		{"redis://h:0", "not a number from 1 to 65535"},
		{"redis://h:65536", "not a number from 1 to 65535"},
		{"redis://h:abc", "not a number from 1 to 65535"},
		{"redis://h:", "not a number from 1 to 65535"},
		{"redis://::1:6379", "IPv6 address in brackets"},
		{"redis://h:1/x", `database "x" is not a number`},
		{"redis://h:1/-1", `database "-1" is not a number`},
		{"redis://h:1/0/1", "too many parts"},
		{"redis://a:1,b:2", "2 hosts for a single server"},
		{"redis://h:1?db=2", "query parameters"},
		{"redis://h:1#x", "query parameters"},
		{"redis://u:p%zz@h:1", "password"},
		{"redis+sentinel://s1:1", "no master name"},
		{"redis+sentinel://s1:1/", "no master name"},
		{"redis+sentinel://s1:1/m/x", `database "x"`},
		{"redis+sentinel://a:1,,b:2/m", "empty host"},
		{"redis+cluster://n1:1/3", "only database 0"},
		{"redis+cluster://n1:1/a/b", "only database 0"},
	} {
		t.Run(tc.url, func(t *testing.T) {
			_, err := ParseURL(tc.url)
			if err == nil {
				t.Fatalf("ParseURL(%q) succeeded, want an error with %q", tc.url, tc.want)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("ParseURL(%q) = %v, want %q in it", tc.url, err, tc.want)
			}
			if !strings.HasPrefix(err.Error(), "store URL ") {
				t.Fatalf("error %q does not say it is about the store URL", err)
			}
		})
	}
}

// A password never reaches an error or a log line.
func TestPasswordHidden(t *testing.T) {
	for _, url := range []string{
		"redis://u:hunter2@h:0",
		"redis://:hunter2@h:1/x",
		"redis+sentinel://u:hunter2@s1:1",
	} {
		_, err := ParseURL(url)
		if err == nil || strings.Contains(err.Error(), "hunter2") {
			t.Errorf("ParseURL(%q) error %v shows the password", url, err)
		}
	}
	for url, want := range map[string]string{
		"redis://u:hunter2@h:1/3":                  "redis://u:xxx@h:1/3",
		"redis://h:1":                              "redis://h:1/0",
		"rediss+sentinel://:hunter2@s1:1,s2:2/m/1": "rediss+sentinel://:xxx@s1:1,s2:2/m/1",
		"redis+cluster://u@n1:1,n2:2":              "redis+cluster://u@n1:1,n2:2",
	} {
		tg, err := ParseURL(url)
		if err != nil {
			t.Fatal(err)
		}
		if got := tg.String(); got != want {
			t.Errorf("Target(%q).String() = %q, want %q", url, got, want)
		}
	}
}

func TestGlobEscape(t *testing.T) {
	for in, want := range map[string]string{
		"policyd:{192.0.2.1}:":     "policyd:{192.0.2.1}:",
		"policyd:{[2001:db8::1]}:": `policyd:{\[2001:db8::1\]}:`,
		`a*b?c\d`:                  `a\*b\?c\\d`,
	} {
		if got := globEscape(in); got != want {
			t.Errorf("globEscape(%q) = %q, want %q", in, got, want)
		}
	}
}
