package luaplugin_test

import (
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/testing/frontendtest"
	_ "github.com/policyd-mail/policyd/rules/badmailfrom"
	_ "github.com/policyd-mail/policyd/rules/connection_shaper"
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
		files                 map[string]string
		sessions              []frontendtest.Session
	}{
		{
			rule:    "lua_connection_shaper",
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
			rule:    "lua_badmailfrom",
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
			refused := 0
			for i := range goRun {
				if !slices.Equal(goRun[i], luaRun[i]) {
					t.Errorf("session %d (%+v):\n  go:  %s\n  lua: %s", i+1, tc.sessions[i], goRun[i], luaRun[i])
				}
				if goRun[i].String() != "rcpt user@example.test: ok; message: ok" {
					refused++
				}
			}
			if refused == 0 {
				t.Fatal("the scenario refuses nothing: it cannot tell the twins apart")
			}
		})
	}
}
