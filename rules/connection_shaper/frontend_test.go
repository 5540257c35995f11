package connectionshaper_test

import (
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/testing/frontendtest"
	_ "github.com/policyd-mail/policyd/rules/connection_shaper"
	_ "github.com/policyd-mail/policyd/rules/whitelist"
)

// The third session within the window is refused for its whole length,
// behind either front-end and on either store; another client, a
// whitelisted one and the same client in a new window are not.
func TestBothFrontEnds(t *testing.T) {
	const refused = "rcpt user@example.test: 4 Too many connections from your address (more than 2 in 1m0s), please try again later"
	sessions := []frontendtest.Session{
		{Client: "192.0.2.1"},
		{Client: "192.0.2.1", Rcpts: []string{"a@example.test", "b@example.test"}},
		{Client: "192.0.2.1"},
		{Client: "192.0.2.2"},
		{Client: "2001:db8:1:2::1"},
		{Client: "2001:db8:1:2::2"},
		{Client: "2001:db8:1:2::3"}, // same /64: the third session
		{Client: "198.51.100.7"},
		{Client: "198.51.100.7"},
		{Client: "198.51.100.7"},
	}
	want := []string{
		"rcpt user@example.test: ok; message: ok",
		"rcpt a@example.test: ok; rcpt b@example.test: ok; message: ok",
		refused,
		"rcpt user@example.test: ok; message: ok",
		"rcpt user@example.test: ok; message: ok",
		"rcpt user@example.test: ok; message: ok",
		refused,
		"rcpt user@example.test: ok; message: ok",
		"rcpt user@example.test: ok; message: ok",
		"rcpt user@example.test: ok; message: ok",
	}
	got := frontendtest.Both(t, "whitelist clients 198.51.100.0/24\nconnection_shaper threshold 2 exptime 60", nil, sessions)
	frontendtest.Expect(t, got, want)

	// A new window: the fake clock moves past exptime (memory store only:
	// Redis expires keys on its own clock).
	again := append(sessions[:3:3], frontendtest.Session{Client: "192.0.2.1", Advance: 61 * time.Second})
	for _, run := range [][]frontendtest.Outcome{
		frontendtest.Policy(t, "connection_shaper threshold 2 exptime 60", nil, again),
		frontendtest.Milter(t, "connection_shaper threshold 2 exptime 60", nil, again),
	} {
		if run[2].String() != refused || run[3].String() != "rcpt user@example.test: ok; message: ok" {
			t.Errorf("window: %v", run)
		}
	}
}
