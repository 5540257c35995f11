package luaplugin_test

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/testing/frontendtest"
	_ "github.com/policyd-mail/policyd/rules/badmailfrom"
	_ "github.com/policyd-mail/policyd/rules/connection_shaper"
	_ "github.com/policyd-mail/policyd/rules/deny_repeat_offenders"
	_ "github.com/policyd-mail/policyd/rules/greylisting"
)

// twin reads a script of examples/plugins.d.
func twin(t *testing.T, name string) string {
	t.Helper()
	code, err := readTwin(name)
	if err != nil {
		t.Fatal(err)
	}
	return code
}

func readTwin(name string) (string, error) {
	code, err := os.ReadFile(filepath.Join("..", "..", "examples", "plugins.d", name+".lua"))
	return string(code), err
}

// The differential test: each example script and the Go rule it copies
// give identical answers to one scenario, behind both front-ends, on the
// embedded store and on Redis (frontendtest.Both runs all four).
func TestTwins(t *testing.T) {
	many := []string{"a@example.test", "b@example.test", "c@example.test"}
	for _, tc := range []struct {
		rule, goLine, luaLine string
		mustSee               string // in some refusal, or the scenario does not exercise the rule
		files                 map[string]string
		sessions              []frontendtest.Session
	}{
		{
			rule:    "lua_connection_shaper",
			mustSee: "Too many connections from your address (more than 2 in 1h0m0s)",
			goLine:  "whitelist clients 198.51.100.0/24\nconnection_shaper threshold 2 exptime 3600 whitelist 203.0.113.0/24",
			luaLine: "whitelist clients 198.51.100.0/24\nlua_connection_shaper threshold 2 exptime 3600 whitelist 203.0.113.0/24",
			sessions: []frontendtest.Session{
				{Client: "192.0.2.1"}, {Client: "192.0.2.1", Rcpts: many}, {Client: "192.0.2.1"},
				{Client: "192.0.2.2"},
				{Client: "2001:db8:1:2::1"}, {Client: "2001:db8:1:2::2"}, {Client: "2001:db8:1:2::3"},
				{Client: "198.51.100.7"}, {Client: "198.51.100.7"}, {Client: "198.51.100.7"},
				{Client: "203.0.113.9"}, {Client: "203.0.113.9"}, {Client: "203.0.113.9"},
				// ten minutes on, still in the window: counted on
				{Client: "192.0.2.2", Advance: 10 * time.Minute}, {Client: "192.0.2.2"}, {Client: "192.0.2.2"},
			},
		},
		{
			rule:    "lua_greylisting",
			mustSee: "This mail is temporarily denied",
			goLine:  "whitelist clients 198.51.100.0/24\ngreylisting black_timeout 60 grey_timeout 300 white_timeout 1000 auto_whitelist 3",
			luaLine: "whitelist clients 198.51.100.0/24\nlua_greylisting black_timeout 60 grey_timeout 300 white_timeout 1000 auto_whitelist 3",
			sessions: []frontendtest.Session{
				{Client: "192.0.2.1", Rcpts: []string{"a@example.test"}},
				{Client: "192.0.2.1", Rcpts: []string{"a@example.test"}, Advance: 30 * time.Second},
				{Client: "192.0.2.1", Rcpts: []string{"a@example.test"}, Advance: 31 * time.Second},
				{Client: "192.0.2.2", Rcpts: []string{"a@example.test", "b@example.test"}},
				{Client: "192.0.2.9", Rcpts: []string{"Postmaster@example.test", "abuse@x.example", "c@example.test"}},
				{Client: "192.0.2.1", Auth: "alice", Rcpts: []string{"d@example.test"}},
				{Client: "198.51.100.7", Rcpts: []string{"e@example.test"}},
				{Client: "2001:db8::1", Rcpts: []string{"a@example.test"}},
				{Client: "2001:db8::2", Rcpts: []string{"a@example.test"}, Advance: 61 * time.Second},
				{Client: "192.0.2.1", From: "other@example.org", Rcpts: []string{"a@example.test", "b@example.test", "c@example.test"}},
				// b and c confirmed: with a, three; the network's new
				// triplets pass from now on
				{Client: "192.0.2.5", Rcpts: []string{"new@example.test"}},
				{Client: "192.0.3.5", Rcpts: []string{"new@example.test"}},
				{Client: "192.0.2.1", Rcpts: []string{"a@example.test"}, Advance: 2000 * time.Second},
			},
		},
		{
			rule:    "lua_deny_repeat_offenders",
			mustSee: "You are a repeat offender. Go away",
			goLine:  "whitelist clients 198.51.100.0/24\nbadmailfrom\ndeny_repeat_offenders threshold 3 reset 600 window 3600",
			luaLine: "whitelist clients 198.51.100.0/24\nbadmailfrom\nlua_deny_repeat_offenders threshold 3 reset 600 window 3600",
			files:   map[string]string{"badmailfrom": "spam@example.org\n"},
			sessions: []frontendtest.Session{
				{Client: "192.0.2.1", From: "spam@example.org", Rcpts: many},
				{Client: "192.0.2.1", From: "spam@example.org"},
				{Client: "192.0.2.1"},
				{Client: "192.0.2.1", From: "spam@example.org", Advance: 601 * time.Second}, // reset passed: starts over
				{Client: "192.0.2.1", From: "spam@example.org"},
				{Client: "192.0.2.1", From: "spam@example.org"},
				{Client: "192.0.2.1"}, // three: deferred
				{Client: "192.0.2.2"},
				{Client: "198.51.100.7", From: "spam@example.org"}, {Client: "198.51.100.7", From: "spam@example.org"},
				{Client: "198.51.100.7", From: "spam@example.org"}, {Client: "198.51.100.7"},
				{Client: "192.0.2.1", Advance: 3601 * time.Second}, // the window passed
			},
		},
		{
			rule:    "lua_badmailfrom",
			mustSee: "no mail from spam.example",
			goLine:  "badmailfrom",
			luaLine: "lua_badmailfrom",
			files:   map[string]string{"badmailfrom": "spammer@example.com\n@spam.example no mail from spam.example\nsender other@example.net\n"},
			sessions: []frontendtest.Session{
				{Client: "192.0.2.1", From: "Spammer@Example.com", Rcpts: many},
				{Client: "192.0.2.1", From: "someone@spam.example"},
				{Client: "192.0.2.1", From: "other@example.net"},
				{Client: "192.0.2.1", From: "friend@example.com"},
				{Client: "192.0.2.1", From: ""},
			},
		},
	} {
		t.Run(tc.rule, func(t *testing.T) {
			goFiles := map[string]string{}
			luaFiles := map[string]string{"plugins.d/" + tc.rule + ".lua": twin(t, tc.rule)}
			for k, v := range tc.files {
				goFiles[k], luaFiles[k] = v, v
			}
			goRun := frontendtest.Both(t, tc.goLine, goFiles, tc.sessions)
			luaRun := frontendtest.Both(t, tc.luaLine, luaFiles, tc.sessions)
			seen := false
			for i := range goRun {
				if !slices.Equal(goRun[i], luaRun[i]) {
					t.Errorf("session %d (%+v):\n  go:  %s\n  lua: %s", i+1, tc.sessions[i], goRun[i], luaRun[i])
				}
				seen = seen || strings.Contains(goRun[i].String(), tc.mustSee)
			}
			if !seen {
				t.Fatalf("no refusal says %q: the scenario cannot tell the twins apart\n%v", tc.mustSee, goRun)
			}
		})
	}
}
