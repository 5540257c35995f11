package denyrepeatoffenders_test

import (
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/testing/frontendtest"
)

// A client refused three times is tempfailed at its next connect, behind
// either front-end; another client is not, and the record ages out.
func TestBothFrontEnds(t *testing.T) {
	tests := []struct {
		name, plugins string
		refused       frontendtest.Session
		refusal       string
	}{
		{
			name:    "fed by badrcptto",
			plugins: "deny_repeat_offenders threshold 3\nbadrcptto recipient @trap.example",
			refused: frontendtest.Session{Client: "192.0.2.1", Rcpts: []string{"victim@trap.example"}},
			refusal: "rcpt victim@trap.example: 5 mail to @trap.example not accepted here",
		},
		{
			name:    "fed by badmailfrom, listed before it",
			plugins: "badmailfrom sender spammer@example.com\ndeny_repeat_offenders ip_deny_db.dbm 3",
			refused: frontendtest.Session{Client: "192.0.2.1", From: "spammer@example.com"},
			refusal: "rcpt user@example.test: 5 sorry, your envelope sender is in my badmailfrom list",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sessions := []frontendtest.Session{
				tc.refused, tc.refused, tc.refused,
				{Client: "192.0.2.1"},
				{Client: "192.0.2.2"},
				{Client: "192.0.2.1", Advance: 12 * time.Hour},
			}
			want := []string{
				tc.refusal, tc.refusal, tc.refusal,
				"rcpt user@example.test: 4 You are a repeat offender. Go away",
				"rcpt user@example.test: ok; message: ok",
				"rcpt user@example.test: ok; message: ok",
			}
			got := frontendtest.Both(t, tc.plugins, nil, sessions)
			frontendtest.Expect(t, got, want)
		})
	}
}
