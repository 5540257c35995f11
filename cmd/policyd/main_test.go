package main

import (
	"bytes"
	"flag"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func TestFlagsAndEnvironmentTwins(t *testing.T) {
	runOptionCases(t, []optionCase{
		{name: "defaults", want: func(o options) bool {
			return o.policyListen == "127.0.0.1:10040" && o.milterListen == "127.0.0.1:10041" && o.httpListen == "127.0.0.1:10042" &&
				o.storeURL == "memory" && o.storeTimeout == 100*time.Millisecond && o.onStoreError == "continue" && o.logFormat == "text"
		}},
		{name: "double and single dash", args: []string{"--policy-listen", "unix:/run/p.sock", "-log-level=debug"}, want: func(o options) bool {
			return o.policyListen == "unix:/run/p.sock" && o.logLevel == "debug"
		}},
		{name: "environment twin", env: map[string]string{"POLICYD_POLICY_LISTEN": "127.0.0.1:2000", "POLICYD_DRY_RUN": "true", "POLICYD_STORE_TIMEOUT": "250ms"}, want: func(o options) bool {
			return o.policyListen == "127.0.0.1:2000" && o.dryRun && o.storeTimeout == 250*time.Millisecond
		}},
		{name: "flag wins over environment", args: []string{"--policy-listen", "127.0.0.1:3000"}, env: map[string]string{"POLICYD_POLICY_LISTEN": "127.0.0.1:2000"}, want: func(o options) bool {
			return o.policyListen == "127.0.0.1:3000"
		}},
		{name: "empty disables", args: []string{"--milter-listen", ""}, want: func(o options) bool { return o.milterListen == "" }},
		{name: "empty environment twin disables", env: map[string]string{"POLICYD_MILTER_LISTEN": ""}, want: func(o options) bool { return o.milterListen == "" }},
		{name: "bad environment value", env: map[string]string{"POLICYD_STORE_TIMEOUT": "soon"}, err: "POLICYD_STORE_TIMEOUT"},
		{name: "stray argument", args: []string{"extra"}, err: `unexpected argument "extra"`},
	})
}

// optionCase is one command line and environment for serve, and what
// its options must then be (want) or the error they give (err).
type optionCase struct {
	name string
	args []string
	env  map[string]string
	want func(o options) bool
	err  string
}

func runOptionCases(t *testing.T, cases []optionCase) {
	t.Helper()
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			o, err := parseOptions(tc.args, tc.env)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want %q", err, tc.err)
				}
				return
			}
			if err != nil || !tc.want(o) {
				t.Fatalf("err=%v options=%+v", err, o)
			}
		})
	}
}

// parseOptions parses serve's flags and environment as the command does.
func parseOptions(args []string, env map[string]string) (options, error) {
	var o options
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	o.register(fs)
	err := parseFlags(fs, args, func(k string) (string, bool) { v, ok := env[k]; return v, ok })
	return o, err
}

func TestCheck(t *testing.T) {
	dir := t.TempDir()
	write := func(name, text string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	write("plugins", "# test\nwhitelist\nconnection_shaper threshold 3 text \"Slow down\"\n")
	write("connection_shaper", "exptime 120\nmemcached_server localhost\n")
	var out, errw bytes.Buffer
	if rc := run([]string{"check", "--config", dir}, &out, &errw); rc != 0 {
		t.Fatalf("rc=%d\n%s%s", rc, out.String(), errw.String())
	}
	for _, want := range []string{
		dir + "/connection_shaper:2: warning: connection_shaper: memcached_server is ignored",
		dir + ": OK, 2 rules",
		"2. connection_shaper (" + dir + "/plugins:3) hooks=connect text=\"Slow down\" exptime=2m0s threshold=3",
	} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, out.String())
		}
	}

	write("plugins", "whitelist clients 10.0.0.0/99\nconnection_shaper threshold x\nnosuchrule\n")
	out.Reset()
	if rc := run([]string{"check", "--config", dir}, &out, &errw); rc != 1 {
		t.Fatalf("bad config: rc=%d", rc)
	}
	want := dir + "/plugins:1: whitelist: clients: \"10.0.0.0/99\" is not a network (like 10.0.0.0/8 or 2001:db8::/32)\n" +
		dir + "/plugins:2: connection_shaper: threshold: \"x\" is not a whole number\n" +
		dir + "/plugins:3: unknown rule \"nosuchrule\"\n"
	if !strings.Contains(out.String(), want) {
		t.Errorf("got:\n%s\nwant:\n%s", out.String(), want)
	}

	out.Reset()
	if rc := run([]string{"check", "--config", filepath.Join(dir, "missing")}, &out, &errw); rc != 1 {
		t.Fatalf("missing dir: rc=%d", rc)
	}
}

func TestCommands(t *testing.T) {
	var out, errw bytes.Buffer
	if rc := run([]string{"version"}, &out, &errw); rc != 0 || !strings.HasPrefix(out.String(), "policyd ") {
		t.Fatalf("version: rc=%d %q", rc, out.String())
	}
	if rc := run([]string{"frobnicate"}, &out, &errw); rc != 2 || !strings.Contains(errw.String(), `unknown command "frobnicate"`) {
		t.Fatalf("unknown command: rc=%d %q", rc, errw.String())
	}
	errw.Reset()
	if rc := run([]string{"serve", "--log-format", "xml"}, &out, &errw); rc != 2 || !strings.Contains(errw.String(), "log-format") {
		t.Fatalf("bad log format: rc=%d %q", rc, errw.String())
	}
	errw.Reset()
	// An unreachable Redis does not stop start-up (mail flows per
	// --on-store-error), but a malformed store URL does.
	if rc := run([]string{"serve", "--store", "redis://127.0.0.1:1/x", "--policy-listen", "", "--http-listen", "", "--milter-listen", ""}, &out, &errw); rc != 1 || !strings.Contains(errw.String(), `database \"x\" is not a number`) {
		t.Fatalf("bad redis store URL: rc=%d %q", rc, errw.String())
	}
}

// A POLICYD_* variable no flag reads stops serve with the known names;
// the others, and variables of other prefixes, pass.
func TestUnknownEnv(t *testing.T) {
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	var o options
	o.register(fs)
	if err := unknownEnv(fs, []string{"POLICYD_STORE=memory", "POLICYD_STATE_DIR=/x", "HOME=/root", "TESTMTA_SENDMAIL_ROOT=/y", "POLICYD_IP=192.0.2.1", "POLICYD_STRICT=1"}); err != nil {
		t.Errorf("known names refused: %v", err)
	}
	err := unknownEnv(fs, []string{"POLICYD_STOR=redis://127.0.0.1:6379/0", "POLICYD_STORE=memory"})
	if err == nil || !strings.Contains(err.Error(), "unknown environment variable POLICYD_STOR:") || !strings.Contains(err.Error(), "POLICYD_STORE") {
		t.Errorf("a misspelt name: %v", err)
	}
}

// Through the binary: serve stops at once, exit code 2.
func TestServeRefusesUnknownEnv(t *testing.T) {
	cmd := exec.Command(binPath, "serve", "--policy-listen", "127.0.0.1:0", "--milter-listen", "", "--http-listen", "")
	cmd.Dir = t.TempDir()
	cmd.Env = append(os.Environ(), "POLICYD_STOR=redis://127.0.0.1:1/0")
	out, err := cmd.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 2 || !strings.Contains(string(out), "POLICYD_STOR") {
		t.Fatalf("serve with POLICYD_STOR set: %v\n%s", err, out)
	}
}

// -h and --help exit 0 on every command; policyd --help names the
// commands, not only serve's flags. Before, check -h exited 2.
func TestHelpExitsZero(t *testing.T) {
	for _, args := range [][]string{{"-h"}, {"--help"}, {"help"}, {"check", "-h"}, {"simulate", "-h"}, {"inspect", "-h"}, {"forget", "--help"}} {
		var out, errs strings.Builder
		if rc := run(args, &out, &errs); rc != 0 {
			t.Errorf("policyd %s: exit %d\n%s", strings.Join(args, " "), rc, errs.String())
		}
	}
	var out strings.Builder
	run([]string{"--help"}, &out, io.Discard)
	if !strings.Contains(out.String(), "policyd check") || !strings.Contains(out.String(), "policyd simulate") {
		t.Errorf("policyd --help does not list the commands:\n%s", out.String())
	}
}

// check reports a rule placed where it cannot act, at its plugins line;
// --strict makes any warning fail. Before, both configurations passed.
func TestCheckOrder(t *testing.T) {
	for _, tc := range []struct {
		plugins, warn string
	}{
		{"denysoft_client_stats\nclient_stats\n", "plugins:1: denysoft_client_stats: needs client_stats before it"},
		{"connection_shaper\nwhitelist clients 192.0.2.1\n", "plugins:2: whitelist: comes after connection_shaper, which it cannot exempt"},
	} {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, "plugins"), []byte(tc.plugins), 0o644)
		var out strings.Builder
		if rc := run([]string{"check", "--config", dir}, &out, io.Discard); rc != 0 || !strings.Contains(out.String(), tc.warn) {
			t.Errorf("check %q: rc=%d, want 0 and %q:\n%s", tc.plugins, rc, tc.warn, out.String())
		}
		out.Reset()
		if rc := run([]string{"check", "--strict", "--config", dir}, &out, io.Discard); rc != 1 {
			t.Errorf("check --strict %q: rc=%d, want 1:\n%s", tc.plugins, rc, out.String())
		}
	}
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "plugins"), []byte("whitelist clients 192.0.2.1\nclient_stats\ndenysoft_client_stats\n"), 0o644)
	if rc := run([]string{"check", "--strict", "--config", dir}, io.Discard, io.Discard); rc != 0 {
		t.Errorf("a well-ordered chain fails check --strict: rc=%d", rc)
	}
}

// check reports a code override that can never apply (before, it was
// accepted and ignored at run time), and a rule that needs the milter
// front-end when --milter-listen is off (only then); --strict fails on
// them.
func TestCheckOverridesAndListeners(t *testing.T) {
	for _, tc := range []struct {
		plugins string
		args    []string
		warn    string // "" for none
	}{
		{"badmailfrom sender x@example.org code 450\n", nil, "plugins:1: warning: badmailfrom: code never applies: the rule answers only DENY"},
		{"greylisting code 550\n", nil, "plugins:1: warning: greylisting: code never applies: the rule answers only DENYSOFT"},
		{"greylisting enhanced 5.7.1\n", nil, "plugins:1: warning: greylisting: enhanced never applies"},
		{"whitelist clients 192.0.2.1 code 550\n", nil, "plugins:1: warning: whitelist: code is never used: the rule never refuses"},
		{"hosts_allow max_conn_ip 2 code 450\n", nil, "hosts_allow: code never applies: the rule answers only DENYSOFT_DISCONNECT"},
		{"greylisting code 451 enhanced 4.7.0\n", nil, ""},
		{"badmailfrom sender x@example.org code 554\n", nil, ""},
		{"hosts_allow max_conn_ip 2\n", []string{"--milter-listen", ""}, "warning: a rule needs the milter front-end, and --milter-listen is off rule=hosts_allow why=max_conn_ip 2 counts concurrent sessions"},
		{"hosts_allow max_conn_ip 2\n", nil, ""},
		{"spamthrottle stmax 20000\n", nil, "warning: a rule may delay longer than --policy-max-delay allows"},
		{"spamthrottle stmax 20000\n", []string{"--policy-max-delay", "30s"}, ""},
		{"spamthrottle stmax 20000\n", []string{"--policy-listen", ""}, ""},
	} {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, "plugins"), []byte(tc.plugins), 0o644)
		var out strings.Builder
		rc := run(append([]string{"check", "--config", dir}, tc.args...), &out, io.Discard)
		if rc != 0 || tc.warn != "" && !strings.Contains(out.String(), tc.warn) || tc.warn == "" && strings.Contains(out.String(), "warning") {
			t.Errorf("check %q %q: rc=%d, want 0 and %q:\n%s", tc.plugins, tc.args, rc, tc.warn, out.String())
		}
		out.Reset()
		wantRC := 0
		if tc.warn != "" {
			wantRC = 1
		}
		if rc := run(append([]string{"check", "--strict", "--config", dir}, tc.args...), &out, io.Discard); rc != wantRC {
			t.Errorf("check --strict %q %q: rc=%d, want %d:\n%s", tc.plugins, tc.args, rc, wantRC, out.String())
		}
	}
}
