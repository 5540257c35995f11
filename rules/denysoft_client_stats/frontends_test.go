package denysoftclientstats_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/policyd-mail/policyd/internal/testing/frontendtest"
)

// A network collects DENYs through client_stats; a new client in it is
// then tempfailed at RCPT behind both front-ends, a client elsewhere not.
// Biases 0 make p exactly permfail/(permfail+success): 1 inside the
// network, 0 for a client with a clean record.
func TestBothFrontEndsRefuseTheBadNetwork(t *testing.T) {
	plugins := "client_stats\nstub rcpt bad@example.test:DENY\ndenysoft_client_stats success_bias 0 permfail_bias 0\n"
	sessions := []frontendtest.Session{
		{Client: "192.0.2.1", Rcpts: []string{"bad@example.test"}},
		{Client: "192.0.2.2", Rcpts: []string{"bad@example.test"}},
		{Client: "192.0.2.3", Rcpts: []string{"bad@example.test"}},
		{Client: "192.0.2.200", Rcpts: []string{"a@example.test", "b@example.test"}},
		{Client: "198.51.100.7"},
		{Client: "198.51.100.7"},
	}
	got := frontendtest.Both(t, plugins, nil, sessions)
	refused := "4 3 permanent failures, 0 successful deliveries from 192.0.2.0/24: Rejecting with probability 1"
	want := []string{
		"rcpt bad@example.test: 5 stub says so",
		"rcpt bad@example.test: 5 stub says so",
		"rcpt bad@example.test: 5 stub says so",
		"rcpt a@example.test: " + refused + "; rcpt b@example.test: " + refused,
		"rcpt user@example.test: ok; message: ok",
		"rcpt user@example.test: ok; message: ok",
	}
	frontendtest.Expect(t, got, want)
}

// The scenario: the refusal rate of new clients inside a network
// full of permfails, with the default biases (p = (3+1)/(3+1+0+1) = 0.8).
// A fixed seed makes both front-ends draw the same numbers, so they must
// agree session by session; the rate must be near p.
func TestBothFrontEndsRefusalRate(t *testing.T) {
	plugins := "client_stats\nstub rcpt bad@example.test:DENY\ndenysoft_client_stats seed 7\n"
	var sessions []frontendtest.Session
	for i := range 3 {
		sessions = append(sessions, frontendtest.Session{Client: fmt.Sprintf("192.0.2.%d", i+1), Rcpts: []string{"bad@example.test"}})
	}
	const n = 200
	for i := range n {
		// No message: a passing client's success would change p.
		sessions = append(sessions, frontendtest.Session{Client: fmt.Sprintf("192.0.2.%d", 10+i), NoData: true})
	}
	got := frontendtest.Both(t, plugins, nil, sessions)
	refused := 0
	for _, o := range got[3:] {
		s := o.String()
		switch {
		case strings.HasPrefix(s, "rcpt user@example.test: 4 3 permanent failures, 0 successful deliveries from 192.0.2.0/24: Rejecting with probability 0.8"):
			refused++
		case s != "rcpt user@example.test: ok":
			t.Fatalf("unexpected outcome %s", s)
		}
	}
	// p = 0.8: mean 160, standard deviation about 5.7; allow four.
	if refused < 137 || refused > 183 {
		t.Fatalf("refused %d of %d, want about %d", refused, n, n*8/10)
	}
	t.Logf("refused %d of %d at p = 0.8", refused, n)
}

// at_connect: the refusal is a 421 at connect behind milter and at the
// first policy request behind Postfix's policy protocol; both show the
// client the same class and text.
func TestBothFrontEndsAtConnect(t *testing.T) {
	plugins := "client_stats\nstub rcpt bad@example.test:DENY\ndenysoft_client_stats at_connect 1 success_bias 0 permfail_bias 0\n"
	sessions := []frontendtest.Session{
		{Client: "192.0.2.1", Rcpts: []string{"bad@example.test"}},
		{Client: "192.0.2.9"},
		{Client: "203.0.113.9"},
	}
	got := frontendtest.Both(t, plugins, nil, sessions)
	want := []string{
		"rcpt bad@example.test: 5 stub says so",
		"rcpt user@example.test: 4 1 permanent failures, 0 successful deliveries from 192.0.2.0/24: Rejecting with probability 1",
		"rcpt user@example.test: ok; message: ok",
	}
	frontendtest.Expect(t, got, want)
}
