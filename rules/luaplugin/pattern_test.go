package luaplugin

import (
	"bytes"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	lua "github.com/yuin/gopher-lua"
)

// patternCases are expressions whose values the sandbox's pattern
// functions must give exactly as the reference Lua 5.1 interpreter does.
var patternCases = []string{
	`string.find("hello world", "o w")`,
	`string.find("hello world", "o", 6)`,
	`string.find("hello", "l+")`,
	`string.find("hello", "(l)(l)")`,
	`string.find("hello", "()ll()")`,
	`string.find("hello", "", 6)`,
	`string.find("", "()", 2)`,
	`string.find("hello", "l", 10)`,
	`string.match("hello", "()", 10)`,
	`string.find("hello", "^h")`,
	`string.find("hello", "^e")`,
	`string.find("a.b", ".", 1, true)`,
	`string.find("a+b", "+", 1, true)`,
	`string.find("abc", "b", -1)`,
	`string.find("abc", "b", -10)`,
	`string.find("abc", "[b-]")`,
	`string.find("a\0b", "%z")`,
	`string.match("key = value", "(%w+)%s*=%s*(%w+)")`,
	`string.match("  trim  ", "^%s*(.-)%s*$")`,
	`string.match("2024-01-02", "(%d+)-(%d+)-(%d+)")`,
	`string.match("[192.0.2.1]", "^%[(.*)%]$")`,
	`string.match("THE (quick) fox", "%((%a+)%)")`,
	`string.match("f(a(b)c)d", "%b()")`,
	`string.match("f(a(b c)d", "%b()")`,
	`string.match("THE (quick) fox", "%f[%a]%a+", 2)`,
	`string.match("THE END", "%f[%w]%w+$")`,
	`string.match("aaa", "a-b")`,
	`string.match("aaab", "a-b")`,
	`string.match("abcabc", "(abc)%1")`,
	`string.match("abcabd", "(abc)%1")`,
	`string.match("]", "[]]")`,
	`string.match("a-z", "[a%-z]+")`,
	`string.match("-", "[a-]")`,
	`string.match("hello123", "[^%d]+")`,
	`string.match("_hello1 x", "[%a_][%w_]*")`,
	`string.match("ab", "a?b")`,
	`string.match("b", "a?b")`,
	`string.match("abc$", "c$")`,
	`string.match("ab$c", "b$c")`,
	`string.match("", ".*")`,
	`string.match("abc", "((a)(b))")`,
	`string.match(string.rep("a", 10), "a*a*a*b")`,
	`string.match("x = 1", "^(%w+)%s*=%s*(%d+)$")`,
	`#string.match("\0x", "[%z]x")`,
	`string.match("Hello", "%u%l+")`,
	`string.match("a.b", "%.")`,
	`string.match("a,b;c", "[%p]+")`,
	`string.match("\t x", "%s+")`,
	`string.match("ff09g", "%x+")`,
	`string.match("123abc", "%D+")`,
	`string.match("abc", "%A*")`,
	`string.match("hello", "l", 10)`,
	`string.match("hello", "()", 4)`,
	`string.match("mx1.example.org", "^mx%d*%.(.+)$")`,
	`string.match("<alice@example.org>", "^<?([^@>]+)@([^>]+)>?$")`,
	`string.gsub("hello world", "o", "0")`,
	`string.gsub("hello world", "(o)", "[%1]")`,
	`string.gsub("hello world", "%w+", "%0 %0", 1)`,
	`string.gsub("abc", "", "-")`,
	`string.gsub("hello", "l", {l = "L"})`,
	`string.gsub("hello", "l+", function(x) return #x end)`,
	`string.gsub("hello", ".", {h = false, e = 3})`,
	`string.gsub("abc", "^a", "x")`,
	`string.gsub("aaa", "^a", "x")`,
	`string.gsub("abc", "b", "%%")`,
	`string.gsub("abc", "b", "%x")`,
	`string.gsub("hello world", "(%w+) (%w+)", "%2 %1")`,
	`string.gsub("abc", "%w", "%1")`,
	`string.gsub("abc", "()", "%1")`,
	`string.gsub("THE (quick) fox", "%f[%a]%a+", "W")`,
	`string.gsub("abc", "b", 7)`,
	`string.gsub("a b c", " ", "", 0)`,
	`string.gsub("a.b.c", "%.", "%%")`,
	`("one two  three"):gsub("(%a+)", function(w) if w == "two" then return nil end return w:upper() end)`,
	`collect(("one two  three"):gmatch("%a+"))`,
	`collect(("k1=v1, k2=v2"):gmatch("(%w+)=(%w+)"))`,
	`collect(("abc"):gmatch(""))`,
	`collect(("abc"):gmatch("()b"))`,
	`collect(("^a^a"):gmatch("^a"))`,
	// Errors: only that there is one is compared.
	`string.find("a", "[a")`,
	`string.find("a", "%")`,
	`string.match("a", "(a")`,
	`string.match("a", "a)")`,
	`string.gsub("abc", "(b)", "%2")`,
	`string.match("a", "%1")`,
	`string.gsub("abc", "b", true)`,
	`string.gsub("abc", "b", function() return {} end)`,
	`string.match("a", "%f")`,
	`string.match("a", "%bx")`,
}

const patternPrelude = `
function ser(ok, ...)
  if not ok then return "ERR" end
  local out = {tostring(select("#", ...))}
  for i = 1, select("#", ...) do
    local v = select(i, ...)
    out[#out + 1] = type(v) .. ":" .. tostring(v)
  end
  return table.concat(out, " ")
end
function collect(it)
  local out = {}
  while true do
    local a, b = it()
    if a == nil then break end
    out[#out + 1] = tostring(a)
    if b ~= nil then out[#out + 1] = tostring(b) end
  end
  return table.concat(out, "|")
end
`

// randomCases are patterns and subjects drawn from pieces that meet
// every branch of the matcher, seeded so a failure repeats.
func randomCases(n int) []string {
	pieces := []string{"a", "b", ".", "%a", "%d", "%s", "[ab]", "[^a]", "[a-c]", "*", "+", "-", "?", "(", ")", "()",
		"%1", "^", "$", "%b()", "%f[%a]", "%", "[", "]", "%.", "x"}
	subj := []string{"a", "b", "c", "1", " ", "(", ")", "x", "."}
	r := rand.New(rand.NewPCG(1, 2))
	out := make([]string, 0, n)
	for range n {
		var p, s strings.Builder
		for range 1 + r.IntN(6) {
			p.WriteString(pieces[r.IntN(len(pieces))])
		}
		for range r.IntN(10) {
			s.WriteString(subj[r.IntN(len(subj))])
		}
		fn := []string{"string.find(%q, %q)", "string.match(%q, %q)", "string.gsub(%q, %q, \"<%%0>\")", "collect(string.gmatch(%q, %q))"}[r.IntN(4)]
		out = append(out, fmt.Sprintf(fn, s.String(), p.String()))
	}
	return out
}

func patternScript(cases []string) string {
	var b strings.Builder
	b.WriteString(patternPrelude)
	for _, c := range cases {
		b.WriteString("emit(ser(pcall(function() return " + c + " end)))\n")
	}
	return b.String()
}

// The sandbox's matcher against the reference interpreter (Debian's
// lua5.1, installed by scripts/install-deps.sh).
func TestPatternsAgreeWithLua51(t *testing.T) {
	ref, err := exec.LookPath("lua5.1")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("lua5.1 is missing: scripts/install-deps.sh installs it")
		}
		t.Skip("lua5.1 is not installed")
	}
	cmd := exec.Command(ref, "-")
	cases := append(slices.Clone(patternCases), randomCases(3000)...)
	cmd.Stdin = strings.NewReader("emit = print\n" + patternScript(cases))
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("lua5.1: %v\n%s", err, stderr.String())
	}
	want := strings.Split(strings.TrimSuffix(string(out), "\n"), "\n")

	L := lua.NewState(lua.Options{SkipOpenLibs: true})
	defer L.Close()
	openSandbox(L)
	var got []string
	L.SetGlobal("emit", L.NewFunction(func(L *lua.LState) int {
		got = append(got, L.CheckString(1))
		return 0
	}))
	if err := L.DoString(patternScript(cases)); err != nil {
		t.Fatal(err)
	}
	if len(got) != len(cases) || len(want) != len(cases) {
		t.Fatalf("%d cases, %d answers from the sandbox, %d from lua5.1", len(cases), len(got), len(want))
	}
	for i, c := range cases {
		if got[i] != want[i] {
			t.Errorf("%s\n  sandbox %q\n  lua5.1  %q", c, got[i], want[i])
		}
	}
}
