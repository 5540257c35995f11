package ratelimit_test

import (
	"testing"

	"github.com/policyd-mail/policyd/internal/testing/frontendtest"
	_ "github.com/policyd-mail/policyd/rules/ratelimit"
)

// Behind both front-ends, on the embedded store and on Redis: alice's 4th
// message is refused with the rule's text, bob's first passes, an
// unauthenticated session is not limited; with a recipients budget the
// 5th recipient of a message is refused and the first four are sent;
// the SIZE= hint is counted at RCPT.
func TestBothFrontEnds(t *testing.T) {
	one := []string{"r@example.net"}
	five := []string{"a@example.net", "b@example.net", "c@example.net", "d@example.net", "e@example.net"}
	for _, tc := range []struct {
		name     string
		plugins  string
		sessions []frontendtest.Session
		want     []string
	}{
		{
			name:    "messages",
			plugins: "ratelimit key sasl_username messages 3/1h",
			sessions: []frontendtest.Session{
				{Client: "192.0.2.1", Auth: "alice@example.org", Rcpts: one},
				{Client: "192.0.2.2", Auth: "alice@example.org", Rcpts: one},
				{Client: "198.51.100.1", Auth: "Alice@Example.org", Rcpts: one},
				{Client: "198.51.100.2", Auth: "alice@example.org", Rcpts: one},
				{Client: "192.0.2.1", Auth: "bob@example.org", Rcpts: one},
				{Client: "192.0.2.1", Rcpts: one},
			},
			want: []string{
				"rcpt r@example.net: ok; message: ok",
				"rcpt r@example.net: ok; message: ok",
				"rcpt r@example.net: ok; message: ok",
				"rcpt r@example.net: 4 Rate limit exceeded for alice@example.org: 4 messages in 1h (limit 3)",
				"rcpt r@example.net: ok; message: ok",
				"rcpt r@example.net: ok; message: ok",
			},
		},
		{
			name:     "recipients",
			plugins:  "ratelimit key sasl_username recipients 4/1h",
			sessions: []frontendtest.Session{{Client: "192.0.2.1", Auth: "alice", Rcpts: five}},
			want: []string{"rcpt a@example.net: ok; rcpt b@example.net: ok; rcpt c@example.net: ok; rcpt d@example.net: ok; " +
				"rcpt e@example.net: 4 Rate limit exceeded for alice: 5 recipients in 1h (limit 4); message: ok"},
		},
		{
			name:    "bytes from the SIZE= hint",
			plugins: "ratelimit key sasl_username bytes 10K/1h",
			sessions: []frontendtest.Session{
				{Client: "192.0.2.1", Auth: "alice", Rcpts: one, Size: 6000},
				{Client: "192.0.2.1", Auth: "alice", Rcpts: one, Size: 6000},
				{Client: "192.0.2.1", Auth: "alice", Rcpts: one, Size: 4000},
			},
			want: []string{
				"rcpt r@example.net: ok; message: ok",
				"rcpt r@example.net: 4 Rate limit exceeded for alice: 12000 bytes in 1h (limit 10240)",
				"rcpt r@example.net: ok; message: ok",
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			frontendtest.Expect(t, frontendtest.Both(t, tc.plugins, nil, tc.sessions), tc.want)
		})
	}
}
