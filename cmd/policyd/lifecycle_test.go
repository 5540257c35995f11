package main

import (
	"bufio"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	gomilter "github.com/emersion/go-milter"

	"github.com/policyd-mail/policyd/internal/testing/frontendtest"
)

func milterMTA(t *testing.T, addr string) *gomilter.ClientSession {
	t.Helper()
	return frontendtest.MTA(t, addr)
}

func wantContinue(t *testing.T, step string, a *gomilter.Action, err error) {
	t.Helper()
	if err != nil || a.Code != gomilter.ActContinue {
		t.Fatalf("%s: %+v %v", step, a, err)
	}
}

// SIGTERM with a milter session open: no new connections, the open
// session runs to its end, then policyd exits 0.
func TestDaemonDrainsOpenMilterSessionOnSIGTERM(t *testing.T) {
	d := startDaemon(t, "--state-dir", t.TempDir(), "--milter-listen", "127.0.0.1:0")
	s := milterMTA(t, d.milter)
	defer s.Close()
	s.Macros(gomilter.CodeConn, "j", "mx.example.test")
	a, err := s.Conn("client.example", gomilter.FamilyInet, 4000, "192.0.2.30")
	wantContinue(t, "connect", a, err)
	a, err = s.Helo("client.example")
	wantContinue(t, "helo", a, err)

	d.cmd.Process.Signal(syscall.SIGTERM)
	d.log.waitFor(t, "stopping: no new connections", 1)
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", d.milter)
		if err != nil {
			break
		}
		c.Close()
		if time.Now().After(deadline) {
			t.Fatal("the milter listener still accepts 10s after SIGTERM")
		}
		time.Sleep(10 * time.Millisecond)
	}

	a, err = s.Mail("<s@example.org>", nil)
	wantContinue(t, "mail after SIGTERM", a, err)
	a, err = s.Rcpt("<r@example.test>", nil)
	wantContinue(t, "rcpt after SIGTERM", a, err)
	a, err = s.HeaderEnd()
	wantContinue(t, "eoh", a, err)
	if _, a, err = s.End(); err != nil || a.Code != gomilter.ActAccept && a.Code != gomilter.ActContinue {
		t.Fatalf("end of message after SIGTERM: %+v %v", a, err)
	}
	select {
	case <-d.done:
		t.Fatal("policyd exited while the MTA still held the session open")
	default:
	}
	s.Close()
	select {
	case <-d.done:
		d.done <- nil
	case <-time.After(20 * time.Second):
		t.Fatalf("no exit after the open milter session ended\n%s", d.log.String())
	}
	if rc := d.cmd.ProcessState.ExitCode(); rc != 0 {
		t.Fatalf("exit code %d", rc)
	}
}

// --dry-run: the rule decides and the decision is logged and counted,
// but the MTA is told to go on.
func TestDaemonGlobalDryRun(t *testing.T) {
	cfg := t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("connection_shaper threshold 1\n"), 0o644)
	d := startDaemon(t, "--config", cfg, "--state-dir", t.TempDir(), "--dry-run", "--milter-listen", "127.0.0.1:0")
	// A trial is said at start, not only in each decision's line.
	if !strings.Contains(d.log.String(), "dry run: every rule decides") {
		t.Errorf("no dry-run line at start:\n%s", d.log.String())
	}
	for i := 1; i <= 2; i++ {
		if got := askPolicy(t, d.policy, "192.0.2.31", string(rune('0'+i)), "s@example.org"); got != "action=DUNNO" {
			t.Fatalf("policy session %d under --dry-run: %s", i, got)
		}
	}
	s := milterMTA(t, d.milter)
	defer s.Close()
	a, err := s.Conn("client.example", gomilter.FamilyInet, 4000, "192.0.2.31")
	wantContinue(t, "milter connect under --dry-run", a, err)
	a, err = s.Helo("client.example")
	wantContinue(t, "milter helo under --dry-run", a, err)

	d.log.waitFor(t, "msg=decision", 2)
	var lines []string
	for _, l := range strings.Split(d.log.String(), "\n") {
		if strings.Contains(l, "msg=decision") {
			lines = append(lines, l)
		}
	}
	for _, l := range lines {
		for _, want := range []string{"rule=connection_shaper", "answer=DENYSOFT", "dry_run=true", "client=192.0.2.31"} {
			if !strings.Contains(l, want) {
				t.Errorf("decision line lacks %q: %s", want, l)
			}
		}
	}
	hasSeries(t, scrape(t, d),
		`policyd_decisions_total{answer="DENYSOFT",dry_run="true",hook="connect",protocol="policy",rule="connection_shaper"} 1`,
		`policyd_decisions_total{answer="DENYSOFT",dry_run="true",hook="connect",protocol="milter",rule="connection_shaper"} 1`,
	)
}

// SIGHUP swaps the chain for new sessions; a milter session open across
// the reload, and a policy session already tracked, finish on the chain
// they started with.
func TestReloadKeepsOpenSessionsOnTheirChain(t *testing.T) {
	cfg := t.TempDir()
	plugins := filepath.Join(cfg, "plugins")
	os.WriteFile(plugins, []byte("badrcptto recipient other@example.test\n"), 0o644)
	d := startDaemon(t, "--config", cfg, "--state-dir", t.TempDir(), "--milter-listen", "127.0.0.1:0")

	open := milterMTA(t, d.milter)
	defer open.Close()
	a, err := open.Conn("client.example", gomilter.FamilyInet, 4000, "192.0.2.40")
	wantContinue(t, "connect", a, err)
	a, err = open.Helo("client.example")
	wantContinue(t, "helo", a, err)
	pc, err := net.Dial("tcp", d.policy)
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	pbr := bufio.NewReader(pc)
	askOld := func(state string) string {
		return policyAsk(t, pc, pbr, "protocol_state="+state, "client_address=192.0.2.41", "client_port=41",
			"instance=old.1", "sender=s@example.org", "recipient=trap@example.test")
	}
	if got := askOld("MAIL"); got != "action=DUNNO" {
		t.Fatalf("policy MAIL before reload: %s", got)
	}

	os.WriteFile(plugins, []byte("badrcptto recipient trap@example.test\n"), 0o644)
	d.cmd.Process.Signal(syscall.SIGHUP)
	d.log.waitFor(t, "msg=reloaded", 1)

	a, err = open.Mail("<s@example.org>", nil)
	wantContinue(t, "mail in the open session", a, err)
	a, err = open.Rcpt("<trap@example.test>", nil)
	wantContinue(t, "rcpt in the session opened before the reload", a, err)
	if got := askOld("RCPT"); got != "action=DUNNO" {
		t.Errorf("policy RCPT of the session tracked before the reload: %s", got)
	}

	fresh := milterMTA(t, d.milter)
	defer fresh.Close()
	a, err = fresh.Conn("client.example", gomilter.FamilyInet, 4001, "192.0.2.40")
	wantContinue(t, "connect after reload", a, err)
	a, err = fresh.Helo("client.example")
	wantContinue(t, "helo after reload", a, err)
	a, err = fresh.Mail("<s@example.org>", nil)
	wantContinue(t, "mail after reload", a, err)
	a, err = fresh.Rcpt("<trap@example.test>", nil)
	if err != nil || a.Code != gomilter.ActReplyCode || a.SMTPCode != 550 {
		t.Errorf("rcpt in a session opened after the reload: %+v %v", a, err)
	}
	nc, err := net.Dial("tcp", d.policy)
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if got := policyAsk(t, nc, bufio.NewReader(nc), "protocol_state=RCPT", "client_address=192.0.2.42", "client_port=42",
		"instance=new.1", "sender=s@example.org", "recipient=trap@example.test"); !strings.HasPrefix(got, "action=550") {
		t.Errorf("policy session after the reload: %s", got)
	}
}

// One daemon wired into both smtpd_milters and check_policy_service
// counts every session twice: a session seen through both (same client
// address and port) is logged once and counted.
func TestDoubleWiringDetected(t *testing.T) {
	d := startDaemon(t, "--state-dir", t.TempDir(), "--milter-listen", "127.0.0.1:0")
	s := milterMTA(t, d.milter)
	defer s.Close()
	a, err := s.Conn("client.example", gomilter.FamilyInet, 4321, "192.0.2.50")
	wantContinue(t, "milter connect", a, err)
	if got := askPolicy(t, d.policy, "192.0.2.50", "4321", "s@example.org"); got != "action=DUNNO" {
		t.Fatalf("policy request: %s", got)
	}
	d.log.waitFor(t, "one SMTP session came through both the milter and the policy protocol", 1)
	pollMetric(t, d, "policyd_double_wiring_total", func(v float64) bool { return v == 1 })
	// Another client through the policy protocol only: nothing more.
	askPolicy(t, d.policy, "192.0.2.51", "4321", "s@example.org")
	pollMetric(t, d, "policyd_double_wiring_total", func(v float64) bool { return v == 1 })
}

// spamthrottle's stmax above --policy-max-delay, behind the policy
// protocol, is said at load: the delays there are cut to the cap.
func TestDelayAboveThePolicyCapWarns(t *testing.T) {
	cfg := t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("spamthrottle st 1000 stmax 20000\n"), 0o644)
	d := startDaemon(t, "--config", cfg, "--state-dir", t.TempDir())
	d.log.waitFor(t, "a rule may delay longer than --policy-max-delay", 1)
	if !strings.Contains(d.log.String(), "rule=spamthrottle max_delay=20s") {
		t.Errorf("the warning does not name the rule and its delay:\n%s", d.log.String())
	}
}
