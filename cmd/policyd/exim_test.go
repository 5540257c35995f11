package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/policyd-mail/policyd/internal/testing/testmta"
)

// eximOptions wires a private Exim to policyd as deploy/exim says.
func eximOptions(t testing.TB, policy string) testmta.EximOptions {
	return testmta.EximDeployOptions(t, repoRoot, policy)
}

// oneLine joins a multi-line reply's texts: Exim folds long texts.
func oneLine(r testmta.Reply) string {
	return strings.Join(strings.Split(r.Text(), "\n"), " ")
}

// Through a real Exim daemon: connection_shaper threshold 3 lets sessions
// 1–3 from one address through and defers the 4th at RCPT with the rule's
// text, another address still gets through, a session with five
// recipients counts once, badmailfrom refuses with 550, each session ends
// in policyd at QUIT (the QUIT ACL's DISCONNECT), the DATA ACL asks at the
// end of each message, and with policyd down
// mail flows.
func TestEximPolicy(t *testing.T) {
	cfg := t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("connection_shaper threshold 3 exptime 3600\nbadmailfrom\n"), 0o644)
	os.WriteFile(filepath.Join(cfg, "badmailfrom"), []byte("spammer@example.org\n"), 0o644)
	d := startDaemon(t, "--config", cfg)
	ex := testmta.StartExim(t, eximOptions(t, d.policy))

	send := func(local, from string, rcpts ...string) testmta.Transcript {
		t.Helper()
		tr := testmta.SendMail(t, ex.Addr(), local, from, rcpts)
		if tr.Err != nil {
			t.Fatalf("session from %s: %v\n%s", local, tr.Err, tr)
		}
		return tr
	}
	// Five recipients in one session count as one session.
	tr := send("127.0.0.21", "a@example.org", "u1@example.test", "u2@example.test", "u3@example.test", "u4@example.test", "u5@example.test")
	for _, r := range tr.RcptReplies() {
		if r.Code != 250 {
			t.Fatalf("five recipients:\n%s", tr)
		}
	}
	for i := 2; i <= 3; i++ {
		if tr := send("127.0.0.21", "a@example.org", "u@example.test"); tr.RcptReplies()[0].Code != 250 || tr.Final().Code != 250 {
			t.Fatalf("session %d:\n%s", i, tr)
		}
	}
	tr = send("127.0.0.21", "a@example.org", "u@example.test")
	r := tr.RcptReplies()[0]
	if r.Code != 450 || !strings.HasPrefix(r.Lines[0], "450-4.7.1 ") ||
		oneLine(r) != "4.7.1 Too many connections from your address (more than 3 in 1h0m0s), 4.7.1 please try again later" {
		t.Fatalf("4th session from one address:\n%s", tr)
	}
	if tr := send("127.0.0.22", "a@example.org", "u@example.test"); tr.RcptReplies()[0].Code != 250 {
		t.Fatalf("another address:\n%s", tr)
	}
	tr = send("127.0.0.23", "spammer@example.org", "u@example.test")
	if r := tr.RcptReplies()[0]; r.Code != 550 || !strings.Contains(r.Text(), "5.7.1 sorry, your envelope sender is in my badmailfrom list") {
		t.Fatalf("badmailfrom:\n%s", tr)
	}
	// The DATA ACL asked at the end of each of the 4 messages accepted.
	pollMetric(t, d, `policyd_hook_duration_seconds_count{hook="data_post",protocol="policy"}`, func(v float64) bool { return v == 4 })
	// Every session said QUIT: none is left tracked.
	pollMetric(t, d, `policyd_sessions_open{protocol="policy"}`, func(v float64) bool { return v == 0 })

	// policyd down: the fail string answers, mail flows.
	d.stop(t)
	if tr := send("127.0.0.24", "spammer@example.org", "u@example.test"); tr.RcptReplies()[0].Code != 250 || tr.Final().Code != 250 {
		t.Fatalf("policyd down:\n%s", tr)
	}
}

// The admin's dry run of the wiring, `exim -bh`, through the same ACL
// files: each scenario one SMTP dialogue, with the answer Exim gives.
func TestEximBH(t *testing.T) {
	cfg := t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("whitelist\nconnection_shaper threshold 1 exptime 3600\nbadmailfrom\nbadrcptto\nhangup\n"), 0o644)
	os.Mkdir(filepath.Join(cfg, "plugins.d"), 0o755)
	os.WriteFile(filepath.Join(cfg, "plugins.d", "hangup.lua"), []byte(`
function hook_rcpt(s)
  if s.txn.rcpt == "drop@example.test" then return DENY_DISCONNECT, "go away" end
  if s.txn.rcpt == "later@example.test" then return DENYSOFT_DISCONNECT, "come back later" end
end`), 0o644)
	os.WriteFile(filepath.Join(cfg, "whitelist"), []byte("clients 127.0.0.40\n"), 0o644)
	os.WriteFile(filepath.Join(cfg, "badmailfrom"), []byte("spammer@example.org\n"), 0o644)
	os.WriteFile(filepath.Join(cfg, "badrcptto"), []byte("abuse-trap@example.test\n"), 0o644)
	d := startDaemon(t, "--config", cfg)
	conf := testmta.NewEximConf(t, eximOptions(t, d.policy))
	dialogue := func(from, to string) string {
		return "EHLO client.example\nMAIL FROM:<" + from + ">\nRCPT TO:<" + to + ">\nQUIT"
	}
	for _, tc := range []struct {
		name, client, from, to string
		want                   string // the RCPT reply's first line
	}{
		{"accepted", "127.0.0.31.40001", "a@example.org", "u@example.test", "250 Accepted"},
		{"connection_shaper defers the second session", "127.0.0.31.40002", "a@example.org", "u@example.test", "450-4.7.1 Too many connections from your address (more than 1 in 1h0m0s),"},
		{"badmailfrom", "127.0.0.32.40003", "spammer@example.org", "u@example.test", "550 5.7.1 sorry, your envelope sender is in my badmailfrom list"},
		{"badrcptto", "127.0.0.33.40004", "a@example.org", "abuse-trap@example.test", "550 5.7.1 mail to abuse-trap@example.test not accepted here"},
		{"whitelisted client: connection_shaper passes it", "127.0.0.40.40005", "a@example.org", "u@example.test", "250 Accepted"},
		{"whitelisted client, second session", "127.0.0.40.40006", "a@example.org", "u@example.test", "250 Accepted"},
		{"521: drop", "127.0.0.35.40008", "a@example.org", "drop@example.test", "521 5.7.1 go away"},
		{"421: defer, not a 550", "127.0.0.36.40009", "a@example.org", "later@example.test", "421 4.7.0 come back later"},
		{"Exim's own relay check still applies", "127.0.0.34.40007", "a@example.org", "u@elsewhere.example", "550 relay not permitted"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, trace := conf.BHTrace(t, tc.client, dialogue(tc.from, tc.to))
			// host_lookup is unset: the ACLs must not look the client's
			// name up themselves (a reverse DNS query every session).
			if strings.Contains(trace, "looking up host name") {
				t.Errorf("the ACLs looked up the client's name with host_lookup unset:\n%s", trace)
			}
			var rcpt string
			lines := strings.Split(out, "\n")
			for i, l := range lines {
				// The reply after MAIL's 250 OK is RCPT's.
				if l == "250 OK" && i+1 < len(lines) {
					rcpt = lines[i+1]
					break
				}
			}
			if rcpt != tc.want {
				t.Fatalf("RCPT answered %q, want %q\n%s", rcpt, tc.want, out)
			}
		})
	}
}

// The client's name reaches policyd when Exim verified one (-oMs stands
// for host_lookup's answer): greylisting's whitelist_client_name lets
// such a client through and defers one of another name, and a client
// without a name is "unknown" to it, never looked up by the ACL.
func TestEximSendsVerifiedName(t *testing.T) {
	cfg := t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("greylisting whitelist_client_name example.org\n"), 0o644)
	d := startDaemon(t, "--config", cfg)
	conf := testmta.NewEximConf(t, eximOptions(t, d.policy))
	for _, tc := range []struct {
		client, name, want string
	}{
		{"127.0.0.51.40001", "mx1.example.org", "250 Accepted"},
		{"127.0.0.52.40002", "a.rather.long.name.of.a.host.that.folds.the.received.line.example.org", "250 Accepted"},
		{"127.0.0.53.40003", "mx.example.net", "450 4.7.1"},
	} {
		out := conf.BS(t, tc.client, tc.name, "EHLO client.example\nMAIL FROM:<a@example.com>\nRCPT TO:<u@example.test>\nQUIT")
		lines := strings.Split(out, "\n")
		var rcpt string
		for i, l := range lines {
			if l == "250 OK" && i+1 < len(lines) {
				rcpt = lines[i+1]
				break
			}
		}
		if !strings.HasPrefix(rcpt, tc.want) {
			t.Errorf("RCPT from %s (%s) answered %q, want %s\n%s", tc.client, tc.name, rcpt, tc.want, out)
		}
	}
}
