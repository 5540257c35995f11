package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/policyd-mail/policyd/internal/testing/testmta"
)

// Two scripts of an admin's, through a real Postfix behind the policy
// protocol and behind milter: one refuses a HELO name at helo, one counts
// recipients per client in the store at rcpt and defers the third. The
// SMTP client sees the scripts' codes and texts.
// luaConfig is a config directory of plugins and the scripts given by name.
func luaConfig(t *testing.T, plugins string, scripts map[string]string) string {
	t.Helper()
	cfg := t.TempDir()
	os.MkdirAll(filepath.Join(cfg, "plugins.d"), 0o755)
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte(plugins), 0o644)
	for name, code := range scripts {
		os.WriteFile(filepath.Join(cfg, "plugins.d", name+".lua"), []byte(code), 0o644)
	}
	return cfg
}

func TestPostfixLuaPlugins(t *testing.T) {
	cfg := luaConfig(t, "no_localhost\nrcpt_counter limit 2\n", map[string]string{"no_localhost": `
function hook_helo(s)
  if s.helo:lower() == "localhost" then return DENY, "You are not localhost" end
end`, "rcpt_counter": `
local limit
function register(args) limit = tonumber(args.limit) or error("limit: a number, please") end
function hook_rcpt(s)
  local n = store.incr(s.remote_ip .. ":rcpts", 3600)
  if n > limit then return DENYSOFT, "Recipient " .. n .. " of " .. limit .. " for " .. s.remote_ip .. " at " .. tostring(s.local_ip) end
end`})
	for _, front := range []string{"policy", "milter"} {
		t.Run(front, func(t *testing.T) {
			var pf *testmta.Postfix
			if front == "policy" {
				d := startDaemon(t, "--config", cfg, "--state-dir", t.TempDir())
				pf = testmta.Start(t, deployPolicyOptions(t, d.policy))
			} else {
				d := startDaemon(t, "--config", cfg, "--state-dir", t.TempDir(), "--milter-listen", "127.0.0.1:0", "--policy-listen", "")
				pf = testmta.Start(t, testmta.Options{ExtraMainCF: deployMainCF(t, "main.cf-milter", d.milter)})
			}
			s, err := testmta.Session(t, pf.Addr(), "127.0.0.6")
			if err != nil {
				t.Fatal(err)
			}
			r, _ := s.Cmd("HELO localhost")
			if front == "milter" {
				// Postfix gives a HELO-stage milter refusal at MAIL FROM.
				r, _ = s.Mail("a@example.org")
			} else {
				// Behind policy the HELO check runs with the first RCPT
				// (smtpd_delay_reject).
				s.Mail("a@example.org")
				r, _ = s.Rcpt("x@example.test")
			}
			if r.Code != 550 || !strings.HasSuffix(r.String(), "You are not localhost") {
				t.Fatalf("HELO localhost: %s\nmaillog:\n%s", r, pf.Maillog())
			}
			s.Close()

			tr := testmta.SendMail(t, pf.Addr(), "127.0.0.7", "a@example.org", []string{"u1@example.test", "u2@example.test", "u3@example.test"})
			replies := tr.RcptReplies()
			if len(replies) != 3 || replies[0].Code != 250 || replies[1].Code != 250 || replies[2].Code/100 != 4 ||
				!strings.HasSuffix(replies[2].String(), "Recipient 3 of 2 for 127.0.0.7 at "+strings.Split(pf.Addr(), ":")[0]) || tr.Final().Code != 250 {
				t.Fatalf("counted recipients:\n%s", tr)
			}
		})
	}
}

// check compiles every script: a syntax error at the script's line, a
// register error at the plugins line.
func TestCheckLuaPlugins(t *testing.T) {
	for _, tc := range []struct {
		plugins, script, want string
	}{
		{"mine", "function hook_connect(s)\n  return DENY,\nend\n", "plugins.d/mine.lua:3: syntax error"},
		{"mine limit x", "function register(a) error('limit: not a number') end\nfunction hook_rcpt(s) end\n", "plugins:1: mine: register: "},
		{"mine", "local x = 1\n", "defines no hook function"},
	} {
		dir := t.TempDir()
		os.MkdirAll(filepath.Join(dir, "plugins.d"), 0o755)
		os.WriteFile(filepath.Join(dir, "plugins"), []byte(tc.plugins+"\n"), 0o644)
		os.WriteFile(filepath.Join(dir, "plugins.d", "mine.lua"), []byte(tc.script), 0o644)
		var out strings.Builder
		if rc := run([]string{"check", "--config", dir}, &out, io.Discard); rc != 1 || !strings.Contains(out.String(), tc.want) {
			t.Errorf("check %q: rc=%d, want 1 and %q:\n%s", tc.plugins, rc, tc.want, out.String())
		}
	}
	// --plugin-dir is searched before plugins.d.
	dir, more := t.TempDir(), t.TempDir()
	os.WriteFile(filepath.Join(dir, "plugins"), []byte("elsewhere\n"), 0o644)
	os.WriteFile(filepath.Join(more, "elsewhere.lua"), []byte("function hook_connect(s) end\n"), 0o644)
	var out strings.Builder
	if rc := run([]string{"check", "--config", dir, "--plugin-dir", more}, &out, io.Discard); rc != 0 || !strings.Contains(out.String(), "1. elsewhere") {
		t.Errorf("check --plugin-dir: rc=%d\n%s", rc, out.String())
	}
}

// Hostile scripts against the daemon: an infinite loop, a doubling
// string, an ever-growing table, endless recursion, a runtime error, at
// eight sessions at once. Every request is answered, every hook is a
// script rule error, and the daemon's memory stays bounded (before the
// concatenation was bounded, the doubling string alone took it past
// 2.6 GB). A broken script on reload keeps the chain that runs.
func TestHostileLuaPlugins(t *testing.T) {
	cfg := luaConfig(t, "hostile\n", map[string]string{"hostile": `
function hook_connect(s)
  local m = s.remote_port % 5
  if m == 0 then while true do end
  elseif m == 1 then local x = "x" for i = 1, 40 do x = x .. x end
  elseif m == 2 then local t = {} local i = 0 while true do i = i + 1 t[i] = {i, tostring(i)} end
  elseif m == 3 then local function f(n) return f(n + 1) + 1 end f(1)
  else local x = nil; x.y = 1 end
end`})
	d := startDaemon(t, "--config", cfg, "--state-dir", t.TempDir())
	pid := d.cmd.Process.Pid
	const workers, each = 8, 25
	var wg sync.WaitGroup
	answers := make(chan string, workers*each)
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				answers <- askPolicy(t, d.policy, fmt.Sprintf("192.0.2.%d", w+1), fmt.Sprint(w*each+i), "a@example.org")
			}
		})
	}
	wg.Wait()
	close(answers)
	for a := range answers {
		if a != "action=DUNNO" {
			t.Fatalf("a hostile script's session was answered %q, want DUNNO (--on-store-error continue)", a)
		}
	}
	pollMetric(t, d, `policyd_rule_errors_total{kind="script",rule="hostile"}`, func(v float64) bool { return v == workers*each })
	if hwm := procStatus(t, pid, "VmHWM"); hwm > 512<<20 {
		t.Errorf("peak RSS %d MiB under hostile scripts, want under 512 MiB", hwm>>20)
	}
	t.Logf("peak RSS under hostile scripts: %d MiB", procStatus(t, pid, "VmHWM")>>20)

	os.WriteFile(filepath.Join(cfg, "plugins.d", "hostile.lua"), []byte("function hook_connect(s)\n  return DENY,\nend\n"), 0o644)
	d.cmd.Process.Signal(syscall.SIGHUP)
	d.log.waitFor(t, "reload refused", 1)
	if !strings.Contains(d.log.String(), "plugins.d/hostile.lua:3: syntax error") {
		t.Fatalf("the refused reload does not name the script's line:\n%s", d.log.String())
	}
	if got := askPolicy(t, d.policy, "192.0.2.99", "5", "a@example.org"); got != "action=DUNNO" {
		t.Fatalf("after a refused reload: %s", got)
	}
}

// simulate runs scripts like any rule, and --at moves the clock a script
// reads with now().
func TestSimulateLuaPlugin(t *testing.T) {
	cfg := luaConfig(t, "office_hours\n", map[string]string{"office_hours": `
function hook_mail(s)
  local hour = math.floor(now() / 3600) % 24
  if hour < 8 or hour >= 18 then return DENYSOFT, "Come back at 08:00 UTC (it is " .. hour .. ")" end
end`})
	for _, tc := range []struct{ at, want string }{
		{"2026-12-04T03:00:00Z", "mail\toffice_hours\tDENYSOFT\tCome back at 08:00 UTC (it is 3)\t0s"},
		{"2026-12-04T10:00:00Z", "mail\t-\tDECLINED\t-\t0s"},
	} {
		var out, errw strings.Builder
		if rc := run([]string{"simulate", "--config", cfg, "--ip", "192.0.2.1", "--from", "a@example.org", "--at", tc.at}, &out, &errw); rc != 0 ||
			!strings.Contains(out.String(), tc.want) {
			t.Errorf("simulate --at %s: rc=%d\n%s%s", tc.at, rc, out.String(), errw.String())
		}
	}
}
