package main

import (
	"bytes"
	"context"
	"github.com/policyd-mail/policyd/internal/testing/testredis"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/rules"
)

// simProbe is a rule of this test binary only: it answers at the hooks
// the shipped rules do not (yet) refuse at, so simulate's stops and
// sticky answers can be checked on the memory store in one session.
type simProbe struct {
	heloDisconnect string
	badSender      string
	badRcpts       []string
	dataDelay      time.Duration
}

func init() {
	rules.Register(rules.Definition{Name: "simulate_probe", Setup: func(b *rules.Binder, _ rules.Env) (any, error) {
		return &simProbe{
			heloDisconnect: b.String("helo_disconnect", ""),
			badSender:      b.String("sender", ""),
			badRcpts:       b.Strings("rcpt"),
			dataDelay:      b.Duration("data_delay", 0, 0, time.Minute),
		}, nil
	}})
}

func (p *simProbe) Helo(_ context.Context, s *rules.Session) (rules.Result, error) {
	if p.heloDisconnect != "" && s.Helo == p.heloDisconnect {
		return rules.Decided(rules.DenySoftDisconnect, "Go away"), nil
	}
	return rules.Result{}, nil
}

func (p *simProbe) Mail(_ context.Context, s *rules.Session) (rules.Result, error) {
	if p.badSender != "" && s.Txn.Sender == p.badSender {
		return rules.Decided(rules.Deny, "Sender refused"), nil
	}
	return rules.Result{}, nil
}

func (p *simProbe) Rcpt(_ context.Context, s *rules.Session) (rules.Result, error) {
	if slices.Contains(p.badRcpts, s.Txn.Rcpt) {
		return rules.Decided(rules.Deny, "No such user"), nil
	}
	return rules.Result{}, nil
}

func (p *simProbe) Data(context.Context, *rules.Session) (rules.Result, error) {
	return rules.Result{Delay: p.dataDelay}, nil
}

func TestSimulate(t *testing.T) {
	const header = "hook\trule\tanswer\ttext\tdelay\n"
	const shaped = "Too many connections from your address (more than 1 in 1m0s), please try again later"
	tests := []struct {
		name    string
		plugins string // empty: the built-in chain
		args    []string
		want    string
	}{{
		name: "built-in chain, a stranger's first message",
		args: []string{"--ip", "192.0.2.1", "--helo", "mx.example.org", "--from", "a@example.org", "--rcpt", "b@example.test"},
		want: "connect\t-\tDECLINED\t-\t0s\n" +
			"helo\t-\tDECLINED\t-\t0s\n" +
			"mail\t-\tDECLINED\t-\t0s\n" +
			"rcpt\t-\tDECLINED\t-\t0s\n" +
			"data\t-\tDECLINED\t-\t0s\n" +
			"data_post\t-\tDECLINED\t-\t0s\n",
	}, {
		name:    "second session over the threshold: connect refused, repeated until MAIL",
		plugins: "connection_shaper threshold 1\n",
		args:    []string{"--ip", "192.0.2.1", "--helo", "mx.example.org", "--rcpt", "b@example.test", "--session", "2"},
		want: "connect\tconnection_shaper\tDENYSOFT\t" + shaped + "\t0s\n" +
			"helo\tconnection_shaper\tDENYSOFT\t" + shaped + "\t0s\n" +
			"mail\tconnection_shaper\tDENYSOFT\t" + shaped + "\t0s\n",
	}, {
		name:    "first session under the threshold",
		plugins: "connection_shaper threshold 1\n",
		args:    []string{"--ip", "192.0.2.1"},
		want: "connect\t-\tDECLINED\t-\t0s\n" +
			"mail\t-\tDECLINED\t-\t0s\n",
	}, {
		name:    "a rule in dry run shows what it would have answered",
		plugins: "connection_shaper threshold 1 dry_run 1 text \"Slow down\"\n",
		args:    []string{"--ip", "2001:db8::1", "--session", "3"},
		want: "connect\tconnection_shaper\tDENYSOFT (dry run)\tSlow down\t0s\n" +
			"connect\t-\tDECLINED\t-\t0s\n" +
			"mail\t-\tDECLINED\t-\t0s\n",
	}, {
		name:    "whitelisted client",
		plugins: "whitelist clients 192.0.2.0/24\nconnection_shaper threshold 1\n",
		args:    []string{"--ip", "192.0.2.1", "--session", "5"},
		want: "connect\t-\tDECLINED\t-\t0s\n" +
			"mail\t-\tDECLINED\t-\t0s\n",
	}, {
		name:    "one recipient refused, the other accepted, a delay at data",
		plugins: "simulate_probe rcpt nobody@example.test data_delay 2s\n",
		args:    []string{"--ip", "192.0.2.1", "--rcpt", "nobody@example.test", "--rcpt", "b@example.test"},
		want: "connect\t-\tDECLINED\t-\t0s\n" +
			"mail\t-\tDECLINED\t-\t0s\n" +
			"rcpt\tsimulate_probe\tDENY\tNo such user\t0s\n" +
			"rcpt\t-\tDECLINED\t-\t0s\n" +
			"data\t-\tDECLINED\t-\t2s\n" +
			"data_post\t-\tDECLINED\t-\t0s\n",
	}, {
		name:    "every recipient refused: no DATA",
		plugins: "simulate_probe rcpt nobody@example.test\n",
		args:    []string{"--ip", "192.0.2.1", "--rcpt", "nobody@example.test"},
		want: "connect\t-\tDECLINED\t-\t0s\n" +
			"mail\t-\tDECLINED\t-\t0s\n" +
			"rcpt\tsimulate_probe\tDENY\tNo such user\t0s\n",
	}, {
		name:    "sender refused: no RCPT",
		plugins: "simulate_probe sender bad@example.org code 554\n",
		args:    []string{"--ip", "192.0.2.1", "--from", "bad@example.org", "--rcpt", "b@example.test"},
		want: "connect\t-\tDECLINED\t-\t0s\n" +
			"mail\tsimulate_probe\tDENY\tSender refused\t0s\n",
	}, {
		name:    "a disconnecting answer ends the session",
		plugins: "simulate_probe helo_disconnect bad.example\n",
		args:    []string{"--ip", "192.0.2.1", "--helo", "bad.example", "--rcpt", "b@example.test"},
		want: "connect\t-\tDECLINED\t-\t0s\n" +
			"helo\tsimulate_probe\tDENYSOFT_DISCONNECT\tGo away\t0s\n",
	}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			args := append([]string{"simulate", "--state-dir", t.TempDir()}, tc.args...)
			if tc.plugins != "" {
				cfg := t.TempDir()
				if err := os.WriteFile(filepath.Join(cfg, "plugins"), []byte(tc.plugins), 0o644); err != nil {
					t.Fatal(err)
				}
				args = append(args, "--config", cfg)
			}
			var out, errw bytes.Buffer
			if rc := run(args, &out, &errw); rc != 0 {
				t.Fatalf("rc=%d\n%s", rc, errw.String())
			}
			if got := out.String(); got != header+tc.want {
				t.Errorf("got:\n%s\nwant:\n%s%s", got, header, tc.want)
			}
			if errw.Len() > 0 {
				t.Errorf("stderr: %s", errw.String())
			}
		})
	}
}

// oneLogFormat fails unless every line of stderr is a log record of the
// daemon's text format. Before, simulate mixed "policyd simulate: …"
// lines, bare config problems and log records.
func oneLogFormat(t *testing.T, stderr string) {
	t.Helper()
	for _, line := range strings.Split(strings.TrimSuffix(stderr, "\n"), "\n") {
		if !strings.HasPrefix(line, "time=") || !strings.Contains(line, " level=") {
			t.Errorf("stderr line is not a log record: %q", line)
		}
	}
}

func TestSimulateUsage(t *testing.T) {
	// Errors must not leave a state directory behind in the package.
	t.Chdir(t.TempDir())
	var out, errw bytes.Buffer
	if rc := run([]string{"simulate", "--help"}, &out, &errw); rc != 0 {
		t.Fatalf("--help: rc=%d", rc)
	}
	for _, want := range []string{"usage: policyd simulate --ip A", "hook, rule, answer, text, delay", "-rcpt", "-session", "-store"} {
		if !strings.Contains(errw.String(), want) {
			t.Errorf("--help lacks %q:\n%s", want, errw.String())
		}
	}
	for _, tc := range []struct {
		args []string
		rc   int
		err  string
	}{
		{[]string{"simulate"}, 2, `--ip is not an IP address" ip=""`},
		{[]string{"simulate", "--ip", "mx.example.org"}, 2, "is not an IP address"},
		{[]string{"simulate", "--ip", "192.0.2.1", "--session", "0"}, 2, "--session must be 1 or more"},
		{[]string{"simulate", "--ip", "192.0.2.1", "--store", "nosuch://"}, 1, "not a store URL"},
		{[]string{"simulate", "--ip", "192.0.2.1", "--store", "redis://127.0.0.1:1/0"}, 1, "the store does not answer"},
		{[]string{"simulate", "--ip", "192.0.2.1", "--config", filepath.Join(t.TempDir(), "missing")}, 1, "config directory"},
	} {
		out.Reset()
		errw.Reset()
		if rc := run(tc.args, &out, &errw); rc != tc.rc || !strings.Contains(errw.String(), tc.err) {
			t.Errorf("%q: rc=%d stderr=%q, want rc=%d and %q", tc.args, rc, errw.String(), tc.rc, tc.err)
		}
		oneLogFormat(t, errw.String())
	}
	// A bad config is reported as check reports it, file:line first.
	cfg := t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("connection_shaper threshold x\n"), 0o644)
	errw.Reset()
	if rc := run([]string{"simulate", "--ip", "192.0.2.1", "--config", cfg}, &out, &errw); rc != 1 ||
		!strings.Contains(errw.String(), cfg+"/plugins:1: connection_shaper: threshold") {
		t.Errorf("bad config: rc=%d %q", rc, errw.String())
	}
	oneLogFormat(t, errw.String())
	// A warning and a rule's own log line share it too.
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("greylisting db_dir /x\n"), 0o644)
	errw.Reset()
	if rc := run([]string{"simulate", "--ip", "192.0.2.1", "--config", cfg, "--rcpt", "a@example.test"}, io.Discard, &errw); rc != 0 ||
		!strings.Contains(errw.String(), "db_dir is ignored") {
		t.Errorf("warning: rc=%d %q", rc, errw.String())
	}
	oneLogFormat(t, errw.String())
}

// simulate against the daemon's Redis reads it and writes nothing to it,
// unless --write; --at previews a retry after greylisting's black_timeout.
// Before, every simulate left its counters, permfails and triplets in
// the production store.
func TestSimulateReadOnly(t *testing.T) {
	srv := testredis.Start(t)
	cfg := t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("greylisting black_timeout 3000\nclient_stats\n"), 0o644)
	sim := func(extra ...string) string {
		t.Helper()
		args := append([]string{"simulate", "--config", cfg, "--store", srv.URL(), "--ip", "192.0.2.60", "--from", "a@example.org", "--rcpt", "b@example.test"}, extra...)
		var out, errw bytes.Buffer
		if rc := run(args, &out, &errw); rc != 0 {
			t.Fatalf("simulate %v: rc=%d\n%s", extra, rc, errw.String())
		}
		return out.String()
	}
	keys := func() string { return srv.MustDo("KEYS", "policyd:*") }
	if out := sim(); !strings.Contains(out, "rcpt\tgreylisting\tDENYSOFT") {
		t.Fatalf("first attempt:\n%s", out)
	}
	if k := keys(); k != "" {
		t.Fatalf("a read-only simulate wrote to Redis: %q", k)
	}
	sim("--write") // the client's first attempt, recorded
	if k := keys(); !strings.Contains(k, "greylisting") {
		t.Fatalf("simulate --write wrote %q", k)
	}
	before := keys()
	if out := sim("--at", "+55m"); !strings.Contains(out, "rcpt\t-\tDECLINED") {
		t.Fatalf("the retry after black_timeout:\n%s", out)
	}
	if out := sim(); !strings.Contains(out, "rcpt\tgreylisting\tDENYSOFT") {
		t.Fatalf("a retry now (the preview promoted nothing):\n%s", out)
	}
	if k := keys(); k != before {
		t.Fatalf("read-only runs changed the keys: %q, then %q", before, k)
	}
}
