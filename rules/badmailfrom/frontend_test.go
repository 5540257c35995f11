package badmailfrom_test

import (
	"testing"

	"github.com/policyd-mail/policyd/internal/testing/frontendtest"
	_ "github.com/policyd-mail/policyd/rules/badmailfrom"
)

// MAIL passes and every RCPT is refused, behind either front-end.
func TestBothFrontEnds(t *testing.T) {
	files := map[string]string{"badmailfrom": "sender spammer@example.com\nsender @spam.example no mail from spam.example\n"}
	sessions := []frontendtest.Session{
		{Client: "192.0.2.1", From: "Spammer@Example.com", Rcpts: []string{"a@example.test", "b@example.test"}},
		{Client: "192.0.2.1", From: "someone@spam.example"},
		{Client: "192.0.2.1", From: "friend@example.com"},
	}
	want := []string{
		"rcpt a@example.test: 5 sorry, your envelope sender is in my badmailfrom list; rcpt b@example.test: 5 sorry, your envelope sender is in my badmailfrom list",
		"rcpt user@example.test: 5 no mail from spam.example",
		"rcpt user@example.test: ok; message: ok",
	}
	got := frontendtest.Both(t, "badmailfrom", files, sessions)
	frontendtest.Expect(t, got, want)
}
