package badrcptto_test

import (
	"testing"

	"github.com/policyd-mail/policyd/internal/testing/frontendtest"
	_ "github.com/policyd-mail/policyd/rules/badrcptto"
)

// A listed recipient is refused, the others of the message go through,
// behind either front-end.
func TestBothFrontEnds(t *testing.T) {
	sessions := []frontendtest.Session{
		{Client: "192.0.2.1", Rcpts: []string{"user@example.test", "Trap@Example.test", "x@closed.example"}},
		{Client: "192.0.2.1", Rcpts: []string{"x@closed.example"}},
	}
	want := []string{
		"rcpt user@example.test: ok; rcpt Trap@Example.test: 5 mail to trap@example.test not accepted here; rcpt x@closed.example: 5 closed; message: ok",
		"rcpt x@closed.example: 5 closed",
	}
	got := frontendtest.Both(t, `badrcptto recipient trap@example.test recipient "@closed.example closed"`, nil, sessions)
	frontendtest.Expect(t, got, want)
}
