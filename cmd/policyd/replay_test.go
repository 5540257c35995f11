package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/testing/testmta"
)

// decisionKey is what the live daemon and the replay must agree on.
type decisionKey struct {
	Client, Hook, Rule, Answer, Sender, Recipient string
}

func (k decisionKey) String() string {
	return fmt.Sprintf("%s %s %s %s <%s> <%s>", k.Client, k.Hook, k.Rule, k.Answer, k.Sender, k.Recipient)
}

// Live and replay agree: a real Postfix asks a live policyd in --dry-run
// at RCPT and DATA (deploy/postfix/main.cf-policy); then `policyd replay`
// reads Postfix's log with the same chain, and every client's would-be
// decisions are the same, in the same order. Set REPLAY_KEEP_MAILLOG to a
// path to keep the log (internal/maillog/testdata was made so).
func TestReplayAgreesWithLive(t *testing.T) {
	cfg := t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("connection_shaper threshold 2 exptime 3600\nbadmailfrom\ngreylisting\ndeny_repeat_offenders threshold 2\n"), 0o644)
	os.WriteFile(filepath.Join(cfg, "badmailfrom"), []byte("spammer@example.org\n"), 0o644)
	d := startDaemon(t, "--config", cfg, "--dry-run", "--log-format", "json")
	pf := testmta.Start(t, deployPolicyOptions(t, d.policy))

	type sess struct {
		ip, from string
		rcpts    []string
	}
	var plan []sess
	// 127.0.0.61: three sessions (connection_shaper's third), new and
	// repeated triplets (greylisting), two messages' worth of recipients.
	for i := range 3 {
		plan = append(plan, sess{"127.0.0.61", "alice@example.org", []string{"u1@example.test", fmt.Sprintf("u%d@example.test", i+2)}})
	}
	// 127.0.0.62: a badmailfrom sender three times (deny_repeat_offenders
	// counts the DENYs), one other sender.
	for range 3 {
		plan = append(plan, sess{"127.0.0.62", "spammer@example.org", []string{"v@example.test"}})
	}
	plan = append(plan, sess{"127.0.0.63", "bob@example.org", []string{"w@example.test"}})
	delivered := 0
	for _, s := range plan {
		tr := testmta.SendMail(t, pf.Addr(), s.ip, s.from, s.rcpts)
		if tr.Err != nil || tr.Final().Code != 250 {
			t.Fatalf("in a dry run every message is accepted:\n%s", tr)
		}
		delivered += len(s.rcpts)
	}
	// qmgr and the delivery agent log each message after its session.
	deadline := time.Now().Add(30 * time.Second)
	for strings.Count(pf.Maillog(), "status=sent") < delivered {
		if time.Now().After(deadline) {
			t.Fatalf("Postfix logged %d deliveries\n%s", strings.Count(pf.Maillog(), "status=sent"), pf.Maillog())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if keep := os.Getenv("REPLAY_KEEP_MAILLOG"); keep != "" {
		os.WriteFile(keep, []byte(pf.Maillog()), 0o644)
	}

	live := map[string][]decisionKey{}
	for _, line := range strings.Split(d.log.String(), "\n") {
		var rec struct {
			Msg, Client, Hook, Rule, Answer, Sender, Recipient string
		}
		if json.Unmarshal([]byte(line), &rec) != nil || rec.Msg != "decision" {
			continue
		}
		live[rec.Client] = append(live[rec.Client], decisionKey{rec.Client, rec.Hook, rec.Rule, rec.Answer, rec.Sender, rec.Recipient})
	}
	if len(live) == 0 {
		t.Fatalf("the live daemon logged no decision:\n%s", d.log.String())
	}

	cmd := exec.Command(binPath, "replay", "--config", cfg, "--json", "--year", fmt.Sprint(time.Now().Year()), pf.MaillogPath())
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("replay: %v\n%s", err, stderr.String())
	}
	replayed := map[string][]decisionKey{}
	for _, line := range strings.Split(strings.TrimSpace(stdout.String()), "\n") {
		var l replayLine
		if err := json.Unmarshal([]byte(line), &l); err != nil {
			t.Fatalf("replay printed %q: %v", line, err)
		}
		if l.Session == "" || l.Time == "" {
			t.Fatalf("replay line without a session or a time: %q", line)
		}
		replayed[l.Client] = append(replayed[l.Client], decisionKey{l.Client, l.Hook, l.Rule, l.Answer, l.Sender, l.Recipient})
	}
	for _, ip := range []string{"127.0.0.61", "127.0.0.62", "127.0.0.63"} {
		if !slices.Equal(live[ip], replayed[ip]) {
			t.Errorf("%s: live decided\n  %v\nreplay decided\n  %v", ip, live[ip], replayed[ip])
		}
	}
	for _, want := range []string{"7 messages, 10 recipients", "0 not understood", "connection_shaper", "badmailfrom", "greylisting", "deny_repeat_offenders", "busiest minute"} {
		if !strings.Contains(stderr.String(), want) {
			t.Errorf("the summary lacks %q:\n%s", want, stderr.String())
		}
	}
	if t.Failed() {
		t.Logf("replay summary:\n%s\nmaillog:\n%s", stderr.String(), pf.Maillog())
	}
}

// Overlapping sessions: each step runs at its own log time, across
// sessions. A's message is queued at 10:05, B (the same client) connects
// at 10:00:10 and is connection_shaper's second session within the
// window: its decision is dated 10:00:10, not after A's last step.
func TestReplayOverlappingSessions(t *testing.T) {
	cfg := t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("connection_shaper threshold 1 exptime 60\n"), 0o644)
	log := filepath.Join(t.TempDir(), "maillog")
	os.WriteFile(log, []byte(`Dec 04 10:00:00 mx postfix/smtpd[1]: connect from a[192.0.2.5]
Dec 04 10:00:01 mx postfix/smtpd[1]: QA: client=a[192.0.2.5]
Dec 04 10:00:10 mx postfix/smtpd[2]: connect from a[192.0.2.5]
Dec 04 10:00:11 mx postfix/smtpd[2]: disconnect from a[192.0.2.5] ehlo=1 quit=1 commands=2
Dec 04 10:05:00 mx postfix/qmgr[3]: QA: from=<s@example.org>, size=10, nrcpt=1 (queue active)
Dec 04 10:05:00 mx postfix/smtpd[1]: disconnect from a[192.0.2.5] ehlo=1 mail=1 rcpt=1 data=1 quit=1 commands=5
Dec 04 10:05:01 mx postfix/local[4]: QA: to=<r@example.test>, relay=local, status=sent (delivered)
`), 0o644)
	var stdout, stderr bytes.Buffer
	if rc := replayCommand([]string{"--config", cfg, "--json", "--year", "2026", log}, nil, &stdout, &stderr); rc != 0 {
		t.Fatalf("rc %d\n%s", rc, stderr.String())
	}
	var l replayLine
	if err := json.Unmarshal(stdout.Bytes(), &l); err != nil || l.Time != "2026-12-04T10:00:10Z" || l.Rule != "connection_shaper" || l.Hook != "connect" {
		t.Fatalf("%v: %s\n%s", err, stdout.String(), stderr.String())
	}
}
