package luaplugin_test

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"
	"testing/fstest"
	"time"

	"github.com/policyd-mail/policyd/rules"
	_ "github.com/policyd-mail/policyd/rules/client_stats"
	"github.com/policyd-mail/policyd/rules/luaplugin"
	"github.com/policyd-mail/policyd/rules/rulestest"
	_ "github.com/policyd-mail/policyd/rules/whitelist"
	"github.com/policyd-mail/policyd/store"
)

// harness is a chain of plugins with the scripts given by name.
func harness(t *testing.T, plugins string, scripts map[string]string, o rulestest.Options) *rulestest.Harness {
	t.Helper()
	files := map[string]string{}
	for name, code := range scripts {
		files["plugins.d/"+name+".lua"] = code
	}
	return rulestest.NewWith(t, plugins, files, o)
}

// session runs connect, helo, mail and one rcpt, stopping at the first
// refusal; it returns the hook and decision that ended it.
func session(h *rulestest.Harness, ip string, prep func(s *rules.Conversation)) (string, rules.Decision) {
	ctx := context.Background()
	s := h.Session(ip)
	defer s.End(ctx)
	if prep != nil {
		prep(s)
	}
	if d := s.Connect(ctx); d.Refuses() {
		return "connect", d
	}
	if d := s.Helo(ctx, "mx.example.org"); d.Refuses() {
		return "helo", d
	}
	if d := s.Mail(ctx, rules.MailFrom{Sender: "<alice@example.org>", QueueID: "Q1"}); d.Refuses() {
		return "mail", d
	}
	s.Txn.Size = 1234
	d := s.Rcpt(ctx, "<bob@example.net>")
	return "rcpt", d
}

// The SPEC's example, as an admin would drop it in.
const heloLiteral = `
local allow
function register(args) allow = args.allow end
function hook_helo(s)
  if allow and net.contains(allow, s.remote_ip) then return DECLINED end
  if s.helo:match("^%[") and s.helo ~= "[" .. s.remote_ip .. "]" then
    return DENY, "HELO literal does not match your address"
  end
end
`

func TestSpecExample(t *testing.T) {
	h := harness(t, "helo_literal allow 192.0.2.0/24", map[string]string{"helo_literal": heloLiteral}, rulestest.Options{})
	ctx := context.Background()
	for _, tc := range []struct {
		ip, helo string
		want     rules.Code
	}{
		{"198.51.100.7", "[10.0.0.1]", rules.Deny},
		{"198.51.100.7", "[198.51.100.7]", rules.Declined},
		{"198.51.100.7", "mx.example.org", rules.Declined},
		{"192.0.2.7", "[10.0.0.1]", rules.Declined},
	} {
		s := h.Session(tc.ip)
		s.Connect(ctx)
		d := s.Helo(ctx, tc.helo)
		if d.Code != tc.want {
			t.Errorf("%s HELO %s: %v %q, want %v", tc.ip, tc.helo, d.Code, d.Text, tc.want)
		}
		if d.Code == rules.Deny && d.Reply.String() != "550 5.7.1 HELO literal does not match your address" {
			t.Errorf("reply %q", d.Reply)
		}
		s.End(ctx)
	}
}

// Every field of the session and transaction, as the script sees them.
func TestSessionFields(t *testing.T) {
	script := `
function hook_rcpt(s)
  local t = s.txn
  return DENY, table.concat({s.remote_ip, s.remote_port, s.remote_host or "nil", s.helo, s.auth_user or "nil",
    s.queue_id or "nil", t.sender, t.rcpt, #t.recipients, t.size or "nil", tostring(s.local_ip)}, "|")
end`
	h := harness(t, "fields", map[string]string{"fields": script}, rulestest.Options{})
	_, d := session(h, "192.0.2.7", func(s *rules.Conversation) {
		s.ClientName, s.AuthUser, s.Local = "client.example.org", "alice", netip.MustParseAddr("198.51.100.25")
	})
	if want := "192.0.2.7|40000|client.example.org|mx.example.org|alice|Q1|alice@example.org|bob@example.net|0|1234|198.51.100.25"; d.Text != want {
		t.Fatalf("fields %q\nwant %q", d.Text, want)
	}
	if _, d := session(h, "192.0.2.7", nil); !strings.HasSuffix(d.Text, "|nil") {
		t.Fatalf("local_ip of an MTA that does not say: %q", d.Text)
	}
}

// A notes table kept in a global is cut loose when its hook call ends: a
// pooled VM's next call may serve another session.
func TestNotesEndWithTheirCall(t *testing.T) {
	script := `
function hook_connect(s) kept = s.notes; kept.x = "a" end
function hook_helo(s) kept.x = "b" end`
	m := &metrics{}
	h := harness(t, "keeper", map[string]string{"keeper": script}, rulestest.Options{Metrics: m})
	var conv *rules.Conversation
	session(h, "192.0.2.1", func(s *rules.Conversation) { conv = s })
	if len(m.errs) != 1 || m.errs[0] != "keeper helo script" || !strings.Contains(h.Logs.String(), "belonged to an earlier hook call") {
		t.Fatalf("rule errors %v\n%s", m.errs, h.Logs)
	}
	if v := conv.Notes.Get("x"); v != "a" {
		t.Fatalf("the note is %v", v)
	}
}

// "a .. b" keeps Lua's __concat metamethod under the length check.
func TestConcatMetamethod(t *testing.T) {
	script := `
local mt = {__concat = function(a, b) return "joined" end}
function hook_connect(s)
  local t = setmetatable({}, mt)
  return DENY, (t .. "x") .. "|" .. ("x" .. t)
end`
	h := harness(t, "meta", map[string]string{"meta": script}, rulestest.Options{})
	if _, d := session(h, "192.0.2.1", nil); d.Text != "joined|joined" {
		t.Fatalf("%v %q\n%s", d.Code, d.Text, h.Logs)
	}
}

// Each answer constant is the engine's answer, with its text.
func TestAnswers(t *testing.T) {
	for _, c := range []rules.Code{rules.Declined, rules.OK, rules.Done, rules.Deny, rules.DenySoft, rules.DenyDisconnect, rules.DenySoftDisconnect} {
		script := "function hook_connect(s) return " + c.String() + `, "because" end`
		h := harness(t, "answer", map[string]string{"answer": script}, rulestest.Options{})
		_, d := session(h, "192.0.2.1", nil)
		if c == rules.Declined || c == rules.OK || c == rules.Done {
			if d.Refuses() {
				t.Errorf("%v refused", c)
			}
			continue
		}
		if d.Code != c || d.Text != "because" {
			t.Errorf("answer %v: got %v %q", c, d.Code, d.Text)
		}
	}
}

// Notes are shared with Go rules, both ways: the script reads the
// whitelist's mark, and sets a transaction note a second script reads.
func TestNotes(t *testing.T) {
	scripts := map[string]string{
		"setter": `function hook_mail(s) s.txn.notes.origin = "lua"; s.notes.count = 3; s.txn.notes.frac = 0.5 end`,
		"reader": `function hook_rcpt(s)
  return DENY, table.concat({tostring(s.notes.whitelisted), s.txn.notes.origin, s.notes.count, s.txn.notes.frac, tostring(s.notes.none)}, ",")
end`,
	}
	h := harness(t, "whitelist clients 192.0.2.0/24\nsetter\nreader", scripts, rulestest.Options{})
	var conv *rules.Conversation
	_, d := session(h, "192.0.2.1", func(s *rules.Conversation) { conv = s })
	if d.Text != "true,lua,3,0.5,nil" {
		t.Fatalf("notes as the script read them: %q", d.Text)
	}
	if v := conv.Notes.Get("count"); v != int64(3) {
		t.Fatalf("a number note reads back in Go as %T %v", v, v)
	}
}

// store.* is namespaced per instance; a key that starts with the client's
// address is filed under the client (inspect and forget find it).
func TestStore(t *testing.T) {
	script := `
function hook_rcpt(s)
  local n = store.incr(s.remote_ip .. ":rcpts", 3600)
  store.set("last", s.txn.rcpt, 60)
  if n > 2 then return DENYSOFT, "too many: " .. n .. " last " .. store.get("last") end
  store.delete("nothing")
end`
	h := harness(t, "counter:0\ncounter:1", map[string]string{"counter": script}, rulestest.Options{})
	for i, want := range []rules.Code{rules.Declined, rules.Declined, rules.DenySoft} {
		if _, d := session(h, "192.0.2.1", nil); d.Code != want {
			t.Fatalf("session %d: %v %q", i+1, d.Code, d.Text)
		} else if want == rules.DenySoft && d.Text != "too many: 3 last bob@example.net" {
			t.Fatalf("text %q", d.Text)
		}
	}
	// Each instance counts in keys of its own; the second did not run in
	// the third session (the first refused).
	recs, err := store.FindClient(context.Background(), h.Store, mustPrefix("192.0.2.1/32"))
	if err != nil || len(recs) != 2 || recs[0].Key != "policyd:{192.0.2.1}:counter:0:script:key=rcpts" || string(recs[0].Value) != "3" ||
		recs[1].Key != "policyd:{192.0.2.1}:counter:1:script:key=rcpts" || string(recs[1].Value) != "2" {
		t.Fatalf("the client's records: %+v %v", recs, err)
	}
	if keys, _ := h.Store.Scan(context.Background(), "policyd:{key=last}:"); len(keys) != 2 || keys[0] != "policyd:{key=last}:counter:0:script" {
		t.Fatalf("keys of the instances: %v", keys)
	}
	// An IPv6 client's key is filed under its network, as a Go rule's is.
	session(h, "2001:db8::7", nil)
	recs, err = store.FindClient(context.Background(), h.Store, mustPrefix("2001:db8::/64"))
	if err != nil || len(recs) != 2 || recs[0].Key != "policyd:{2001:db8::/64}:counter:0:script:key=rcpts" {
		t.Fatalf("the IPv6 client's records: %+v %v", recs, err)
	}
}

// The forbidden globals are absent; the allowed libraries are there.
func TestSandbox(t *testing.T) {
	script := `
function hook_connect(s)
  local present = {}
  for _, g in ipairs({"io", "os", "require", "dofile", "loadfile", "load", "loadstring", "debug", "package",
      "collectgarbage", "getfenv", "setfenv", "module", "print", "coroutine", "newproxy"}) do
    if _G[g] ~= nil then present[#present + 1] = g end
  end
  if not (string.format and table.insert and math.floor and pcall and now and net and log and store and config) then
    present[#present + 1] = "a library is missing"
  end
  return DENY, "present: " .. table.concat(present, ",")
end`
	h := harness(t, "sandbox", map[string]string{"sandbox": script}, rulestest.Options{})
	if _, d := session(h, "192.0.2.1", nil); d.Text != "present: " {
		t.Fatalf("%s", d.Text)
	}
}

// now() is the engine's clock.
func TestNow(t *testing.T) {
	h := harness(t, "clock", map[string]string{"clock": `function hook_connect(s) return DENY, string.format("%.3f", now()) end`}, rulestest.Options{})
	_, d := session(h, "192.0.2.1", nil)
	if want := fmt.Sprintf("%.3f", float64(h.Clock.Now().UnixNano())/1e9); d.Text != want {
		t.Fatalf("now() = %s, clock %s", d.Text, want)
	}
}

// metrics records rule errors by kind.
type metrics struct {
	mu   sync.Mutex
	errs []string
}

func (*metrics) Decision(string, rules.Hook, string, rules.Code, bool) {}
func (*metrics) HookDuration(string, rules.Hook, time.Duration)        {}
func (m *metrics) RuleError(rule string, h rules.Hook, kind string) {
	m.mu.Lock()
	m.errs = append(m.errs, rule+" "+h.String()+" "+kind)
	m.mu.Unlock()
}
func (*metrics) Delayed(string, rules.Hook, string, time.Duration) {}
func (*metrics) RuleEvent(string, string)                          {}

// A hostile or broken script is a rule error of kind "script", handled as
// a store error: skipped with --on-store-error continue, DENYSOFT with
// tempfail; the session goes on, and the next call gets a fresh VM.
func TestBudgetsAndErrors(t *testing.T) {
	for _, tc := range []struct {
		name, body, log string
	}{
		{"infinite loop", "while true do end", "stopped after its budget of 20ms (timeout)"},
		{"loop under pcall", "while true do pcall(function() while true do end end) end", "stopped after its budget"},
		{"string.rep", `local s = string.rep("x", 1e9)`, "string.rep: the result would exceed 1048576 bytes"},
		{"doubling concatenation", `local s = "x" for i = 1, 40 do s = s .. s end`, "hostile.lua:2: concatenation: the result would exceed 1048576 bytes"},
		{"doubling string.format", `local s = "x" for i = 1, 40 do s = string.format("%s%s", s, s) end`, "string.format: the result would exceed 1048576 bytes|stopped after its budget"},
		{"doubling gsub", `local s = "xx" for i = 1, 40 do s = s:gsub(".", "%0%0") end`, "string.gsub: the result would exceed 1048576 bytes|stopped after its budget"},
		{"concatenating nil", `local s = "x" .. nil`, "attempt to concatenate a nil value"},
		// One call each that would build gigabytes or run for minutes.
		{"backtracking find", `local s = string.rep("a", 400) s:find(".-.-.-.-.-b")`, "stopped after its budget"},
		{"backtracking gmatch", `for w in string.rep("a", 400):gmatch(".-.-.-.-.-b") do end`, "stopped after its budget"},
		{"backtracking gsub", `string.rep("a", 400):gsub(".-.-.-.-.-b", "")`, "stopped after its budget"},
		{"pattern too deep", `string.rep("a", 300):find(string.rep("a?", 300))`, "pattern too complex"},
		{"one huge gsub", `local s = string.rep("x", 1e6) s:gsub("", string.rep("y", 1e6))`, "string.gsub: the result would exceed 1048576 bytes"},
		{"one huge gsub by captures", `local s = string.rep("x", 1e5) s:gsub("(.*)", string.rep("%1", 4e5))`, "string.gsub: the result would exceed 1048576 bytes"},
		{"format width", `string.format("%0999999d", 1)`, "invalid format (width or precision too long)"},
		{"format argument again", `string.format(string.rep("%[1]s", 900), "x")`, "invalid option in format"},
		{"one huge format", `local a = string.rep("x", 1e6) local f = string.rep("%s", 4000)
		  local t = {} for i = 1, 4000 do t[i] = a end string.format(f, unpack(t))`, "string.format: the result would exceed 1048576 bytes"},
		{"one huge table.concat", `local a = string.rep("x", 1e6) local t = {} for i = 1, 5000 do t[i] = a end table.concat(t)`, "table.concat: the result would exceed 1048576 bytes"},
		{"huge unpack", `unpack({}, 1, 1e8)`, "too many results to unpack"},
		{"store calls forever", `while true do store.incr("n", 60) end`, "store: more than 100 store calls in one hook call"},
		{"unbounded table", "local t = {} local i = 0 while true do i = i + 1 t[i] = {i} end", "stopped"},
		{"deep recursion", "local function f(n) return f(n + 1) + 1 end f(1)", "stack overflow"},
		{"runtime error", `local x = nil; x.y = 1`, "plugins.d/hostile.lua:"},
		{"bad answer", `return "yes"`, "answered a string, not an answer constant"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			script := "function hook_connect(s)\n" + tc.body + "\nend\nfunction hook_helo(s) return DENY, 'helo ran' end"
			m := &metrics{}
			// The cases that build a large string before they fail are
			// given time (the race detector slows the VM many times): what
			// must stop them is the size check, not the budget.
			plugins := "hostile timeout 20ms"
			if !strings.Contains(tc.log, "|") && (strings.Contains(tc.log, "would exceed") || strings.Contains(tc.log, "too many")) {
				plugins = "hostile timeout 10s"
			}
			h := harness(t, plugins, map[string]string{"hostile": script}, rulestest.Options{Metrics: m})
			hook, d := session(h, "192.0.2.1", nil)
			if hook != "helo" || d.Text != "helo ran" {
				t.Fatalf("continue: the session ended at %s with %v %q", hook, d.Code, d.Text)
			}
			if len(m.errs) != 1 || m.errs[0] != "hostile connect script" {
				t.Fatalf("rule errors %v", m.errs)
			}
			// A slow way to grow a string may meet the time budget
			// before the size cap: either bounds it.
			if !slices.ContainsFunc(strings.Split(tc.log, "|"), func(w string) bool { return strings.Contains(h.Logs.String(), w) }) {
				t.Fatalf("log lacks %q:\n%s", tc.log, h.Logs)
			}
			h = harness(t, plugins, map[string]string{"hostile": script}, rulestest.Options{OnStoreError: rules.FailTempfail})
			if hook, d := session(h, "192.0.2.1", nil); hook != "connect" || d.Code != rules.DenySoft {
				t.Fatalf("tempfail: %s %v %q", hook, d.Code, d.Text)
			}
		})
	}
}

// Load-time problems are config errors at their file and line.
func TestConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		plugins, script, want string
	}{
		{"broken", "function hook_connect(s)\n  return DENY,\nend", "config/plugins.d/broken.lua:3: syntax error"},
		{"broken", "x = 1", "config/plugins:1: broken: config/plugins.d/broken.lua defines no hook function"},
		{"broken limit x", `function register(args) if not tonumber(args.limit) then error("limit: not a number") end end
function hook_connect(s) end`, "config/plugins:1: broken: register: config/plugins.d/broken.lua:1: limit: not a number"},
		{"whitelist", "function hook_connect(s) end", "config/plugins:1: whitelist is a built-in rule and config/plugins.d/whitelist.lua a script of that name"},
		{"broken", "while true do end\nfunction hook_connect(s) end", "config/plugins:1: broken: config/plugins.d/broken.lua: did not finish within its budget"},
	} {
		name, _, _ := strings.Cut(tc.plugins, " ")
		fsys := fstest.MapFS{"plugins": {Data: []byte(tc.plugins)}, "plugins.d/" + name + ".lua": {Data: []byte(tc.script)}}
		_, _, err := rules.Load(fsys, "config", rules.Options{})
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s:\n got %v\nwant %s", tc.plugins, err, tc.want)
		}
	}
	_ = luaplugin.DefaultTimeout
}

func mustPrefix(s string) netip.Prefix { return netip.MustParsePrefix(s) }

// The notify hooks run (answers ignored), log.* writes to the daemon's
// log with the script and client, and dry_run applies to a script as to
// any rule.
func TestNotifyLogAndDryRun(t *testing.T) {
	script := `
function hook_reset_transaction(s) store.incr(s.remote_ip .. ":resets", 60) end
function hook_disconnect(s) log.info("bye " .. store.get(s.remote_ip .. ":resets")); return DENY, "ignored" end
function hook_rcpt(s) return DENY, "would refuse" end`
	h := harness(t, "notify dry_run 1", map[string]string{"notify": script}, rulestest.Options{})
	if _, d := session(h, "192.0.2.1", nil); d.Refuses() {
		t.Fatalf("dry_run refused: %v %q", d.Code, d.Text)
	}
	logs := h.Logs.String()
	for _, want := range []string{`msg="bye 1"`, "script=config/plugins.d/notify.lua", "client=192.0.2.1", `text="would refuse"`, "dry_run=true"} {
		if !strings.Contains(logs, want) {
			t.Errorf("logs lack %s:\n%s", want, logs)
		}
	}
}
