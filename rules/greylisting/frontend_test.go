package greylisting_test

import (
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/testing/frontendtest"
	_ "github.com/policyd-mail/policyd/rules/greylisting"
)

// The same retries behind the policy protocol and milter: deferred at
// first, let through after black_timeout, and still later.
func TestBothFrontEnds(t *testing.T) {
	tests := []struct {
		name    string
		plugins string
		black   time.Duration
	}{
		{"qpsmtpd's defaults", "greylisting", 50 * time.Minute},
		{"second-scale timeouts", "greylisting black_timeout 2 grey_timeout 10 white_timeout 60", 2 * time.Second},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			sessions := []frontendtest.Session{
				{Client: "192.0.2.1"},
				{Client: "192.0.2.1", Advance: tc.black - time.Second},
				{Client: "192.0.2.77", Advance: time.Second}, // same /24: the retry
				{Client: "192.0.2.1", Advance: tc.black * 10},
				{Client: "192.0.2.1", Rcpts: []string{"user@example.test", "new@example.test"}},
				{Client: "198.51.100.1"},
			}
			want := []string{
				"rcpt user@example.test: 4 This mail is temporarily denied",
				"rcpt user@example.test: 4 This mail is temporarily denied",
				"rcpt user@example.test: ok; message: ok",
				"rcpt user@example.test: ok; message: ok",
				"rcpt user@example.test: ok; rcpt new@example.test: 4 This mail is temporarily denied; message: ok",
				"rcpt user@example.test: 4 This mail is temporarily denied",
			}
			got := frontendtest.Both(t, tc.plugins, nil, sessions)
			frontendtest.Expect(t, got, want)
		})
	}
}
