package main

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/policyd-mail/policyd/internal/testing/testmta"
)

// deployPolicyOptions runs Postfix with deploy/postfix/main.cf-policy.
// That snippet lets mynetworks through before policyd and relies on
// reject_unauth_destination, so the test clients (127.0.0.2 and up) are
// taken out of mynetworks and example.test is made a relay domain.
func deployPolicyOptions(t testing.TB, addr string) testmta.Options {
	return testmta.Options{ExtraMainCF: append([]string{"mynetworks = 127.0.0.1/32", "relay_domains = example.test"},
		deployMainCF(t, "main.cf-policy", addr)...)}
}

// Through a real Postfix: check_policy_service at RCPT, smtpd_delay_reject
// on, connection_shaper threshold 3. Sessions 1–3 from one address are
// accepted, the 4th gets 450 4.7.1 at RCPT, another address still gets
// through, and one session with five recipients counts once.
func TestPostfixPolicyConnectionShaper(t *testing.T) {
	cfg := t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("whitelist\nconnection_shaper threshold 3 exptime 3600\n"), 0o644)
	os.WriteFile(filepath.Join(cfg, "whitelist"), []byte("clients 127.0.0.200\n"), 0o644)
	d := startDaemon(t, "--config", cfg)
	pf := testmta.Start(t, deployPolicyOptions(t, d.policy))

	send := func(local string, rcpts ...string) testmta.Transcript {
		t.Helper()
		tr := testmta.SendMail(t, pf.Addr(), local, "sender@example.org", rcpts)
		if tr.Err != nil {
			t.Fatalf("session from %s: %v\n%s", local, tr.Err, tr)
		}
		return tr
	}
	accepted := func(tr testmta.Transcript) {
		t.Helper()
		for _, r := range tr.RcptReplies() {
			if r.Code != 250 {
				t.Fatalf("session from %s: RCPT got %s\n%s", tr.Local, r, tr)
			}
		}
		if tr.Final().Code != 250 {
			t.Fatalf("session from %s: message not accepted: %s\n%s", tr.Local, tr.Final(), tr)
		}
	}

	for i := 1; i <= 3; i++ {
		accepted(send("127.0.0.2", fmt.Sprintf("user%d@example.test", i)))
	}
	tr := send("127.0.0.2", "user4@example.test")
	r := tr.RcptReplies()[0]
	want := "450 4.7.1 <user4@example.test>: Recipient address rejected: Too many connections from your address (more than 3 in 1h0m0s), please try again later"
	if r.String() != want {
		t.Fatalf("4th session: RCPT got\n  %s\nwant\n  %s\n%s", r, want, tr)
	}
	if tr.Final().Code != 0 {
		t.Fatalf("4th session: a message went through: %s", tr)
	}

	accepted(send("127.0.0.3", "other@example.test"))
	accepted(send("127.0.0.4", "a@example.test", "b@example.test", "c@example.test", "d@example.test", "e@example.test"))
	// The whitelisted address is never counted.
	for range 5 {
		accepted(send("127.0.0.200", "w@example.test"))
	}

	// Exactly one decision was logged, for the 4th session.
	if n := strings.Count(d.log.String(), "msg=decision"); n != 1 {
		t.Fatalf("%d decision lines, want 1:\n%s", n, d.log.String())
	}
	if !strings.Contains(d.log.String(), "client=127.0.0.2") {
		t.Fatalf("decision line lacks the client:\n%s", d.log.String())
	}
	hasSeries(t, scrape(t, d),
		`policyd_decisions_total{answer="DENYSOFT",dry_run="false",hook="connect",protocol="policy",rule="connection_shaper"} 1`,
		`policyd_store_operations_total{op="incr",result="ok"} 6`,
	)
	if rc := d.stop(t); rc != 0 {
		t.Fatalf("policyd exit code %d", rc)
	}
}

// The same through swaks, the way an operator checks a deployment.
func TestPostfixPolicyWithSwaks(t *testing.T) {
	cfg := t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("connection_shaper threshold 1 text \"Slow down\"\n"), 0o644)
	d := startDaemon(t, "--config", cfg)
	pf := testmta.Start(t, deployPolicyOptions(t, d.policy))
	host, port, _ := strings.Cut(pf.Addr(), ":")
	swaks := func() string {
		out, _ := testmta.Swaks(t, "--server", host, "--port", port, "--local-interface", "127.0.0.5",
			"--from", "a@example.org", "--to", "b@example.test")
		return out
	}
	if out := swaks(); !strings.Contains(out, "250 2.0.0 Ok: queued") {
		t.Fatalf("first session not queued:\n%s", out)
	}
	if out := swaks(); !strings.Contains(out, "<** 450 4.7.1 <b@example.test>: Recipient address rejected: Slow down") {
		t.Fatalf("second session not refused at RCPT:\n%s", out)
	}
}

// The same rule behind Postfix's smtpd_milters: the 4th SMTP session from
// one address sees 451 4.7.1 with the rule's text (Postfix gives a
// HELO-stage milter reply at MAIL FROM), another address gets through.
func TestPostfixMilterConnectionShaper(t *testing.T) {
	cfg := t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("connection_shaper threshold 3 exptime 3600\n"), 0o644)
	d := startDaemon(t, "--config", cfg, "--milter-listen", "127.0.0.1:0", "--policy-listen", "")
	pf := testmta.Start(t, testmta.Options{ExtraMainCF: deployMainCF(t, "main.cf-milter", d.milter)})

	send := func(local string, rcpts ...string) testmta.Transcript {
		t.Helper()
		tr := testmta.SendMail(t, pf.Addr(), local, "sender@example.org", rcpts)
		if tr.Err != nil {
			t.Fatalf("session from %s: %v\n%s", local, tr.Err, tr)
		}
		return tr
	}
	for i := 1; i <= 3; i++ {
		tr := send("127.0.0.2", "a@example.test", "b@example.test")
		if tr.Final().Code != 250 {
			t.Fatalf("session %d not accepted:\n%s\nmaillog:\n%s", i, tr, pf.Maillog())
		}
	}
	tr := send("127.0.0.2", "a@example.test")
	want := "451 4.7.1 Too many connections from your address (more than 3 in 1h0m0s), please try again later"
	if got := tr.Reply("MAIL").String(); got != want {
		t.Fatalf("4th session: MAIL got\n  %s\nwant\n  %s\n%s", got, want, tr)
	}
	if tr := send("127.0.0.3", "a@example.test"); tr.Final().Code != 250 {
		t.Fatalf("other address refused:\n%s", tr)
	}
	hasSeries(t, scrape(t, d),
		`policyd_decisions_total{answer="DENYSOFT",dry_run="false",hook="connect",protocol="milter",rule="connection_shaper"} 1`,
		`~policyd_hook_duration_seconds_count\{hook="data_post",protocol="milter"\} [1-9]\d*`,
		`~policyd_sessions_open\{protocol="milter"\} \d+`,
	)
	if rc := d.stop(t); rc != 0 {
		t.Fatalf("policyd exit code %d", rc)
	}
}

// The same scenario behind a private Sendmail 8.17 (INPUT_MAIL_FILTER).
// Sendmail throws away the text of a connect-stage milter reply, so
// policyd gives the refusal at HELO: the client sees the rule's own
// 451 4.7.1 text at MAIL FROM, as behind Postfix.
//
// The same with the Lua twin of the rule, a script from
// examples/plugins.d found through --plugin-dir: an admin's plugin runs
// behind Sendmail without a rebuild.
func TestSendmailMilterConnectionShaper(t *testing.T) {
	plugins, err := filepath.Abs(filepath.Join("..", "..", "examples", "plugins.d"))
	if err != nil {
		t.Fatal(err)
	}
	for _, rule := range []string{"connection_shaper", "lua_connection_shaper"} {
		t.Run(rule, func(t *testing.T) { sendmailShaper(t, rule, plugins) })
	}
}

func sendmailShaper(t *testing.T, rule, plugins string) {
	cfg := t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte(rule+" threshold 3 exptime 3600\n"), 0o644)
	d := startDaemon(t, "--config", cfg, "--milter-listen", "127.0.0.1:0", "--policy-listen", "", "--plugin-dir", plugins)
	sm := testmta.StartSendmail(t, testmta.SendmailOptions{MilterAddr: d.milter, MilterFlags: deployMilterFlags(t)})

	send := func(local string, rcpts ...string) testmta.Transcript {
		t.Helper()
		tr := testmta.SendMail(t, sm.Addr(), local, "sender@example.org", rcpts)
		if tr.Err != nil {
			t.Fatalf("session from %s: %v\n%s", local, tr.Err, tr)
		}
		return tr
	}
	for i := 1; i <= 3; i++ {
		if tr := send("127.0.0.2", "a@example.test", "b@example.test"); tr.Final().Code != 250 {
			t.Fatalf("session %d not accepted:\n%s", i, tr)
		}
	}
	tr := send("127.0.0.2", "a@example.test")
	want := "451 4.7.1 Too many connections from your address (more than 3 in 1h0m0s), please try again later"
	if got := tr.Reply("MAIL").String(); got != want {
		t.Fatalf("4th session: MAIL got\n  %s\nwant\n  %s\n%s", got, want, tr)
	}
	if tr := send("127.0.0.3", "a@example.test"); tr.Final().Code != 250 {
		t.Fatalf("other address refused:\n%s", tr)
	}
	hasSeries(t, scrape(t, d),
		`policyd_decisions_total{answer="DENYSOFT",dry_run="false",hook="connect",protocol="milter",rule="`+rule+`"} 1`,
		`~policyd_hook_duration_seconds_count\{hook="data_post",protocol="milter"\} [1-9]\d*`,
		`~policyd_sessions_open\{protocol="milter"\} \d+`,
	)
	if rc := d.stop(t); rc != 0 {
		t.Fatalf("policyd exit code %d", rc)
	}
}

// deny_repeat_offenders fed by badmailfrom: three refused sessions, then
// a daemon restart on the same --state-dir, and the client's next session
// is still refused at connect; another client is not.
func TestRepeatOffenderSurvivesRestart(t *testing.T) {
	cfg, state := t.TempDir(), t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("deny_repeat_offenders threshold 3\nbadmailfrom\n"), 0o644)
	os.WriteFile(filepath.Join(cfg, "badmailfrom"), []byte("sender spam@example.org\n"), 0o644)
	ask := func(d *proc, client, port, sender string) string {
		t.Helper()
		c, err := net.Dial("tcp", d.policy)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return policyAsk(t, c, bufio.NewReader(c), "protocol_state=RCPT", "client_address="+client, "client_port="+port,
			"helo_name=h.example", "sender="+sender, "recipient=r@example.test", "instance=a.b.c.0")
	}
	d := startDaemon(t, "--config", cfg, "--state-dir", state)
	for i := 1; i <= 3; i++ {
		if got := ask(d, "192.0.2.66", fmt.Sprint(i), "spam@example.org"); !strings.HasPrefix(got, "action=550 5.7.1") {
			t.Fatalf("session %d: %s", i, got)
		}
	}
	if rc := d.stop(t); rc != 0 {
		t.Fatalf("exit code %d", rc)
	}
	d = startDaemon(t, "--config", cfg, "--state-dir", state)
	if got := ask(d, "192.0.2.66", "4", "ok@example.org"); !strings.HasPrefix(got, "action=450 4.7.1") {
		t.Fatalf("4th session after restart: %s\n%s", got, d.log.String())
	}
	if got := ask(d, "192.0.2.67", "1", "ok@example.org"); got != "action=DUNNO" {
		t.Fatalf("another client: %s", got)
	}
}
