package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/policyd-mail/policyd/internal/testing/testmta"
	"github.com/policyd-mail/policyd/internal/testing/testredis"
)

// xclientSession is one SMTP session from local in which the client, an
// authorized XCLIENT host, says it logged in as login ("" for none):
// Postfix then gives policyd the login as sasl_username (policy) and
// {auth_authen} (milter). It returns the RCPT replies and the reply to
// the message ("" when none was sent).
func xclientSession(t *testing.T, addr, local, login string, rcpts ...string) ([]testmta.Reply, string) {
	t.Helper()
	s, err := testmta.Session(t, addr, local)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	must := func(r testmta.Reply, err error, want int) testmta.Reply {
		t.Helper()
		if err != nil || r.Code != want {
			t.Fatalf("session from %s as %q: got %s (%v), want %d", local, login, r, err, want)
		}
		return r
	}
	r, err := s.Ehlo("client.example.test")
	must(r, err, 250)
	if login != "" {
		r, err = s.Cmd("XCLIENT LOGIN=" + login)
		must(r, err, 220)
		r, err = s.Ehlo("client.example.test")
		must(r, err, 250)
	}
	r, err = s.Mail("sender@example.org")
	if err != nil || r.Code != 250 {
		return []testmta.Reply{r}, ""
	}
	var replies []testmta.Reply
	accepted := 0
	for _, rc := range rcpts {
		r, err := s.Rcpt(rc)
		if err != nil {
			t.Fatal(err)
		}
		replies = append(replies, r)
		if r.OK() {
			accepted++
		}
	}
	final := ""
	if accepted > 0 {
		r, err := s.Data(fmt.Sprintf("From: <sender@example.org>\nSubject: ratelimit\n\nmessage for %s\n", login))
		if err != nil {
			t.Fatal(err)
		}
		final = r.String()
	}
	s.Quit()
	return replies, final
}

// Through a real Postfix, behind the policy protocol and behind milter,
// with authenticated sessions made by XCLIENT LOGIN: alice's 4th message
// is refused with the rule's text, bob's first goes through, an
// unauthenticated session is not limited; with recipients 4/1h, a
// 5-recipient message gets its 5th recipient refused.
func TestPostfixRatelimit(t *testing.T) {
	for _, front := range []string{"policy", "milter"} {
		t.Run(front, func(t *testing.T) {
			cfg := t.TempDir()
			os.WriteFile(filepath.Join(cfg, "plugins"), []byte("ratelimit:0 key sasl_username messages 3/1h\nratelimit:1 key sasl_username recipients 4/1h\n"), 0o644)
			xclient := "smtpd_authorized_xclient_hosts = 127.0.0.0/8"
			var pf *testmta.Postfix
			var d *proc
			if front == "policy" {
				d = startDaemon(t, "--config", cfg, "--state-dir", t.TempDir())
				o := deployPolicyOptions(t, d.policy)
				o.ExtraMainCF = append(o.ExtraMainCF, xclient)
				pf = testmta.Start(t, o)
			} else {
				d = startDaemon(t, "--config", cfg, "--state-dir", t.TempDir(), "--milter-listen", "127.0.0.1:0", "--policy-listen", "")
				pf = testmta.Start(t, testmta.Options{ExtraMainCF: append(deployMainCF(t, "main.cf-milter", d.milter), xclient)})
			}
			code, enh := "450", "4.7.1"
			if front == "milter" {
				code = "451"
			}
			sent := func(local, login string, rcpts ...string) {
				t.Helper()
				replies, final := xclientSession(t, pf.Addr(), local, login, rcpts...)
				for _, r := range replies {
					if r.Code != 250 {
						t.Fatalf("%s as %q: RCPT got %s\nmaillog:\n%s", local, login, r, pf.Maillog())
					}
				}
				if !strings.HasPrefix(final, "250") {
					t.Fatalf("%s as %q: message got %q", local, login, final)
				}
			}
			for i := 1; i <= 3; i++ {
				sent("127.0.0.2", "alice@example.org", fmt.Sprintf("u%d@example.test", i))
			}
			replies, final := xclientSession(t, pf.Addr(), "127.0.0.3", "alice@example.org", "u4@example.test")
			want := code + " " + enh + " Rate limit exceeded for alice@example.org: 4 messages in 1h (limit 3)"
			if front == "policy" {
				want = code + " " + enh + " <u4@example.test>: Recipient address rejected: Rate limit exceeded for alice@example.org: 4 messages in 1h (limit 3)"
			}
			if len(replies) != 1 || replies[0].String() != want || final != "" {
				t.Fatalf("alice's 4th message: %v, %q; want\n  %s", replies, final, want)
			}
			sent("127.0.0.2", "bob@example.org", "v@example.test")
			for range 4 {
				sent("127.0.0.4", "", "w@example.test")
			}

			replies, final = xclientSession(t, pf.Addr(), "127.0.0.5", "carol@example.org",
				"a@example.test", "b@example.test", "c@example.test", "d@example.test", "e@example.test")
			for i, r := range replies[:4] {
				if r.Code != 250 {
					t.Fatalf("carol's recipient %d: %s", i+1, r)
				}
			}
			if r := replies[4].String(); !strings.HasPrefix(r, code+" "+enh+" ") || !strings.HasSuffix(r, "Rate limit exceeded for carol@example.org: 5 recipients in 1h (limit 4)") {
				t.Fatalf("carol's 5th recipient: %s", r)
			}
			if !strings.HasPrefix(final, "250") {
				t.Fatalf("carol's message to the first four: %q", final)
			}
			hasSeries(t, scrape(t, d), `policyd_ratelimit_exceeded_total{rule="ratelimit:0"} 1`, `policyd_ratelimit_exceeded_total{rule="ratelimit:1"} 1`)
		})
	}
}

// Two daemons on one Redis share a limit: alice's messages through
// either count against one budget.
func TestRatelimitSharedOnRedis(t *testing.T) {
	srv := testredis.Start(t)
	cfg := t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("ratelimit key sasl_username messages 3/1h\n"), 0o644)
	a := startDaemon(t, "--config", cfg, "--store", srv.URL())
	b := startDaemon(t, "--config", cfg, "--store", srv.URL())
	ask := func(d *proc, port int) string {
		return askPolicyAs(t, d.policy, "192.0.2.9", fmt.Sprint(port), "alice@example.org")
	}
	for i, d := range []*proc{a, b, a} {
		if got := ask(d, i+1); got != "action=DUNNO" {
			t.Fatalf("message %d: %s", i+1, got)
		}
	}
	if got := ask(b, 4); got != "action=450 4.7.1 Rate limit exceeded for alice@example.org: 4 messages in 1h (limit 3)" {
		t.Fatalf("4th message, through the other daemon: %s", got)
	}
	// inspect by key, through either daemon, shows the shared budget;
	// forget unblocks alice on both.
	out, errs, rc := admin(t, a, "inspect", "--key", "sasl_username=Alice@example.org")
	if rc != 0 || !strings.Contains(out, "sasl_username=alice@example.org: 1 record") ||
		!strings.Contains(out, "messages: 3 of 3 per 1h, whole in ") {
		t.Fatalf("inspect --key: rc=%d %s\n%s", rc, errs, out)
	}
	if out, errs, rc := admin(t, b, "forget", "--key", "sasl_username=alice@example.org"); rc != 0 || !strings.Contains(out, "deleted 1 record") {
		t.Fatalf("forget --key: rc=%d %s\n%s", rc, errs, out)
	}
	if got := ask(a, 5); got != "action=DUNNO" {
		t.Fatalf("after forget: %s", got)
	}
}

// askPolicyAs sends one RCPT request of a new session as an authenticated
// user.
func askPolicyAs(t testing.TB, addr, client, port, login string) string {
	t.Helper()
	return askRcpt(t, addr, "client_address="+client, "client_port="+port,
		"helo_name=h.example", "sender=s@example.org", "recipient=r@example.test", "sasl_username="+login)
}
