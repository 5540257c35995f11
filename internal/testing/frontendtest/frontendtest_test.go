package frontendtest

import (
	"testing"

	_ "github.com/policyd-mail/policyd/rules/all"
)

func TestBothFrontEndsAgree(t *testing.T) {
	sessions := []Session{
		{Client: "192.0.2.1", Rcpts: []string{"a@example.test", "b@example.test"}},
		{Client: "192.0.2.1"},
		{Client: "192.0.2.1"},
		{Client: "192.0.2.2"},
	}
	got := Both(t, "connection_shaper threshold 2", nil, sessions)
	want := []string{
		"rcpt a@example.test: ok; rcpt b@example.test: ok; message: ok",
		"rcpt user@example.test: ok; message: ok",
		"rcpt user@example.test: 4 Too many connections from your address (more than 2 in 1m0s), please try again later",
		"rcpt user@example.test: ok; message: ok",
	}
	for i := range want {
		if got[i].String() != want[i] {
			t.Errorf("session %d: %s\nwant %s", i+1, got[i], want[i])
		}
	}
}

func TestNormalise(t *testing.T) {
	for in, want := range map[string]string{
		"DUNNO": "ok", "450 4.7.1 slow down": "4 slow down", "550 5.7.1 100%% spam": "5 100% spam", "421 4.7.0 bye": "4 bye",
	} {
		if got := normalise(in); got != want {
			t.Errorf("normalise(%q) = %q, want %q", in, got, want)
		}
	}
}
