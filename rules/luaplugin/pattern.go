package luaplugin

import (
	"context"
	"errors"
	"fmt"
	"strings"

	lua "github.com/yuin/gopher-lua"
)

// The VM's own pattern functions (find, match, gmatch, gsub) are one Go
// call each: a backtracking pattern such as ".-.-.-b" on a few hundred
// bytes runs for minutes inside that one call, where the time budget
// never looks, and gsub builds its whole result (or gmatch its whole
// list of matches) before anything could check the size. So the sandbox
// has its own matcher, written to Lua 5.1's pattern rules, that looks at
// the call's budget as it backtracks, refuses patterns nested past
// maxMatchDepth, and grows gsub's result no further than MaxString.

const (
	maxCaptures   = 32
	maxMatchDepth = 200
	// checkEvery is how many matcher steps pass between looks at the
	// budget: often enough to stop within a fraction of a millisecond,
	// rarely enough to cost nothing.
	checkEvery = 1 << 10

	capUnfinished = -1
	capPosition   = -2
)

// errPatternSpent stops a match whose call's budget is spent; the call
// then reports the budget, not the pattern.
var errPatternSpent = errors.New("pattern matching stopped: the time budget is spent")

type patternError string

type capture struct{ start, n int }

type matcher struct {
	ctx   context.Context
	src   string
	pat   string
	depth int
	steps int
	caps  []capture
	ncap  int
}

func (m *matcher) fail(format string, args ...any) {
	panic(patternError(fmt.Sprintf(format, args...)))
}

func (m *matcher) step() {
	m.steps++
	if m.steps%checkEvery == 0 && m.ctx != nil && m.ctx.Err() != nil {
		panic(errPatternSpent)
	}
}

// classEnd is the index just past the single-character class at p.
func (m *matcher) classEnd(p int) int {
	pat := m.pat
	c := pat[p]
	p++
	switch c {
	case '%':
		if p >= len(pat) {
			m.fail("malformed pattern (ends with '%%')")
		}
		return p + 1
	case '[':
		if p < len(pat) && pat[p] == '^' {
			p++
		}
		// The first ']' of a set is a member, not its end.
		for first := true; ; first = false {
			if p >= len(pat) {
				m.fail("malformed pattern (missing ']')")
			}
			c := pat[p]
			p++
			switch {
			case c == ']' && !first:
				return p
			case c == '%':
				if p >= len(pat) {
					m.fail("malformed pattern (missing ']')")
				}
				p++
			}
		}
	}
	return p
}

func isClass(c byte, cl byte) bool {
	var res bool
	switch cl | 0x20 {
	case 'a':
		res = isAlpha(c)
	case 'c':
		res = c < 32 || c == 127
	case 'd':
		res = c >= '0' && c <= '9'
	case 'l':
		res = c >= 'a' && c <= 'z'
	case 'p':
		res = isPunct(c)
	case 's':
		res = c == ' ' || (c >= '\t' && c <= '\r')
	case 'u':
		res = c >= 'A' && c <= 'Z'
	case 'w':
		res = isAlpha(c) || (c >= '0' && c <= '9')
	case 'x':
		res = (c >= '0' && c <= '9') || (c|0x20 >= 'a' && c|0x20 <= 'f')
	case 'z':
		res = c == 0
	default:
		return cl == c
	}
	if cl >= 'A' && cl <= 'Z' {
		return !res
	}
	return res
}

func isAlpha(c byte) bool { return c|0x20 >= 'a' && c|0x20 <= 'z' }

func isPunct(c byte) bool {
	return c > 32 && c < 127 && !isAlpha(c) && !(c >= '0' && c <= '9')
}

// inSet reports whether c is in the set pat[p:ep], p at its '[' and ep
// just past its ']'.
func (m *matcher) inSet(c byte, p, ep int) bool {
	pat := m.pat
	p++
	want := true
	if pat[p] == '^' {
		want = false
		p++
	}
	end := ep - 1
	for ; p < end; p++ {
		switch {
		case pat[p] == '%' && p+1 < end:
			p++
			if isClass(c, pat[p]) {
				return want
			}
		case p+2 < end && pat[p+1] == '-':
			if pat[p] <= c && c <= pat[p+2] {
				return want
			}
			p += 2
		case pat[p] == c:
			return want
		}
	}
	return !want
}

// single reports whether the byte at s matches the class pat[p:ep].
func (m *matcher) single(s, p, ep int) bool {
	if s >= len(m.src) {
		return false
	}
	c := m.src[s]
	switch m.pat[p] {
	case '.':
		return true
	case '%':
		return isClass(c, m.pat[p+1])
	case '[':
		return m.inSet(c, p, ep)
	}
	return m.pat[p] == c
}

// match returns the end of the match of pat[p:] at src[s:], or -1.
func (m *matcher) match(s, p int) int {
	m.depth++
	if m.depth > maxMatchDepth {
		m.fail("pattern too complex")
	}
	defer func() { m.depth-- }()
	for {
		m.step()
		if p == len(m.pat) {
			return s
		}
		switch m.pat[p] {
		case '(':
			if p+1 < len(m.pat) && m.pat[p+1] == ')' {
				return m.startCapture(s, p+2, capPosition)
			}
			return m.startCapture(s, p+1, capUnfinished)
		case ')':
			return m.endCapture(s, p+1)
		case '$':
			if p+1 == len(m.pat) {
				if s == len(m.src) {
					return s
				}
				return -1
			}
		case '%':
			if p+1 < len(m.pat) {
				switch c := m.pat[p+1]; {
				case c == 'b':
					s = m.balance(s, p+2)
					if s == -1 {
						return -1
					}
					p += 4
					continue
				case c == 'f':
					p += 2
					if p >= len(m.pat) || m.pat[p] != '[' {
						m.fail("missing '[' after '%%f' in pattern")
					}
					ep := m.classEnd(p)
					// Before the subject's start and after its end is '\0'.
					var prev, cur byte
					if s > 0 {
						prev = m.src[s-1]
					}
					if s < len(m.src) {
						cur = m.src[s]
					}
					if m.inSet(prev, p, ep) || !m.inSet(cur, p, ep) {
						return -1
					}
					p = ep
					continue
				case c >= '0' && c <= '9':
					s = m.backRef(s, c)
					if s == -1 {
						return -1
					}
					p += 2
					continue
				}
			}
		}
		ep := m.classEnd(p)
		ok := m.single(s, p, ep)
		if ep < len(m.pat) {
			switch m.pat[ep] {
			case '?':
				if ok {
					if r := m.match(s+1, ep+1); r != -1 {
						return r
					}
				}
				p = ep + 1
				continue
			case '*':
				return m.maxExpand(s, p, ep)
			case '+':
				if !ok {
					return -1
				}
				return m.maxExpand(s+1, p, ep)
			case '-':
				return m.minExpand(s, p, ep)
			}
		}
		if !ok {
			return -1
		}
		s++
		p = ep
	}
}

func (m *matcher) maxExpand(s, p, ep int) int {
	i := 0
	for m.single(s+i, p, ep) {
		m.step()
		i++
	}
	for ; i >= 0; i-- {
		if r := m.match(s+i, ep+1); r != -1 {
			return r
		}
	}
	return -1
}

func (m *matcher) minExpand(s, p, ep int) int {
	for {
		if r := m.match(s, ep+1); r != -1 {
			return r
		}
		if !m.single(s, p, ep) {
			return -1
		}
		s++
	}
}

func (m *matcher) startCapture(s, p, what int) int {
	if m.ncap >= maxCaptures {
		m.fail("too many captures")
	}
	if len(m.caps) <= m.ncap {
		m.caps = append(m.caps, capture{})
	}
	m.caps[m.ncap] = capture{start: s, n: what}
	m.ncap++
	r := m.match(s, p)
	if r == -1 {
		m.ncap--
	}
	return r
}

func (m *matcher) endCapture(s, p int) int {
	l := -1
	for i := m.ncap - 1; i >= 0; i-- {
		if m.caps[i].n == capUnfinished {
			l = i
			break
		}
	}
	if l == -1 {
		m.fail("invalid pattern capture")
	}
	m.caps[l].n = s - m.caps[l].start
	r := m.match(s, p)
	if r == -1 {
		m.caps[l].n = capUnfinished
	}
	return r
}

func (m *matcher) balance(s, p int) int {
	if p+1 >= len(m.pat) {
		m.fail("unbalanced pattern")
	}
	if s >= len(m.src) || m.src[s] != m.pat[p] {
		return -1
	}
	open, close := m.pat[p], m.pat[p+1]
	depth := 1
	for i := s + 1; i < len(m.src); i++ {
		m.step()
		switch m.src[i] {
		case close:
			depth--
			if depth == 0 {
				return i + 1
			}
		case open:
			depth++
		}
	}
	return -1
}

func (m *matcher) backRef(s int, c byte) int {
	l := int(c - '1')
	if l < 0 || l >= m.ncap || m.caps[l].n == capUnfinished {
		m.fail("invalid capture index")
	}
	if m.caps[l].n == capPosition {
		// Lua compares the subject with a length no subject has.
		return -1
	}
	want := m.src[m.caps[l].start : m.caps[l].start+m.caps[l].n]
	if strings.HasPrefix(m.src[s:], want) {
		return s + len(want)
	}
	return -1
}

// value is capture i of the match src[s:e] as Lua sees it: the whole
// match when the pattern has no captures.
func (m *matcher) value(i, s, e int) lua.LValue {
	if i >= m.ncap {
		if i == 0 {
			return lua.LString(m.src[s:e])
		}
		m.fail("invalid capture index")
	}
	c := m.caps[i]
	switch c.n {
	case capUnfinished:
		m.fail("unfinished capture")
	case capPosition:
		return lua.LNumber(c.start + 1)
	}
	return lua.LString(m.src[c.start : c.start+c.n])
}

// push pushes the captures (or the whole match when wholeIfNone and the
// pattern has none) and says how many.
func (m *matcher) push(L *lua.LState, s, e int, wholeIfNone bool) int {
	n := m.ncap
	if n == 0 && wholeIfNone {
		n = 1
	}
	for i := range n {
		L.Push(m.value(i, s, e))
	}
	return n
}

// run calls f, turning the matcher's errors into Lua errors.
func runPattern(L *lua.LState, f func() int) (n int) {
	defer func() {
		switch e := recover().(type) {
		case nil:
		case patternError:
			L.RaiseError("%s", string(e))
		case error:
			if errors.Is(e, errPatternSpent) {
				L.RaiseError("%s", e.Error())
			}
			panic(e)
		default:
			panic(e)
		}
	}()
	return f()
}

func newMatcher(L *lua.LState, src, pat string) *matcher {
	return &matcher{ctx: L.Context(), src: src, pat: pat}
}

// startIndex turns Lua's init argument into a byte offset; as in Lua
// 5.1, one past the end is as far as it goes.
func startIndex(init, l int) int {
	switch {
	case init < 0:
		init = max(l+init+1, 1)
	case init == 0:
		init = 1
	}
	return min(init, l+1) - 1
}

const specials = "^$*+?.([%-"

func strFind(L *lua.LState) int  { return findAux(L, true) }
func strMatch(L *lua.LState) int { return findAux(L, false) }

func findAux(L *lua.LState, find bool) int {
	src, pat := L.CheckString(1), L.CheckString(2)
	init := startIndex(L.OptInt(3, 1), len(src))
	if init < 0 {
		L.Push(lua.LNil)
		return 1
	}
	if find && (lua.LVAsBool(L.Get(4)) || !strings.ContainsAny(pat, specials)) {
		i := strings.Index(src[init:], pat)
		if i < 0 {
			L.Push(lua.LNil)
			return 1
		}
		L.Push(lua.LNumber(init + i + 1))
		L.Push(lua.LNumber(init + i + len(pat)))
		return 2
	}
	return runPattern(L, func() int {
		m := newMatcher(L, src, pat)
		p, anchored := 0, false
		if pat != "" && pat[0] == '^' {
			p, anchored = 1, true
		}
		for s := init; ; s++ {
			m.ncap = 0
			if e := m.match(s, p); e != -1 {
				if find {
					L.Push(lua.LNumber(s + 1))
					L.Push(lua.LNumber(e))
					return 2 + m.push(L, s, e, false)
				}
				return m.push(L, s, e, true)
			}
			if anchored || s >= len(src) {
				break
			}
		}
		L.Push(lua.LNil)
		return 1
	})
}

type gmatchState struct {
	src, pat string
	next     int
	done     bool
}

func strGmatch(L *lua.LState) int {
	ud := L.NewUserData()
	ud.Value = &gmatchState{src: L.CheckString(1), pat: L.CheckString(2)}
	L.Push(L.NewClosure(gmatchIter, ud))
	return 1
}

func gmatchIter(L *lua.LState) int {
	st := L.CheckUserData(lua.UpvalueIndex(1)).Value.(*gmatchState)
	if st.done {
		return 0
	}
	return runPattern(L, func() int {
		m := newMatcher(L, st.src, st.pat)
		for s := st.next; s <= len(st.src); s++ {
			m.ncap = 0
			if e := m.match(s, 0); e != -1 {
				// An empty match moves on by one, so the loop ends.
				st.next = e
				if e == s {
					st.next = e + 1
				}
				return m.push(L, s, e, true)
			}
		}
		st.done = true
		return 0
	})
}

func strGsub(L *lua.LState) int {
	src, pat := L.CheckString(1), L.CheckString(2)
	repl := L.Get(3)
	switch repl.Type() {
	case lua.LTNumber, lua.LTString, lua.LTTable, lua.LTFunction:
	default:
		L.ArgError(3, "string/function/table expected")
	}
	maxN := L.OptInt(4, len(src)+1)
	return runPattern(L, func() int {
		m := newMatcher(L, src, pat)
		p, anchored := 0, false
		if pat != "" && pat[0] == '^' {
			p, anchored = 1, true
		}
		var out strings.Builder
		grow := func(s string) {
			if out.Len()+len(s) > MaxString {
				L.RaiseError("string.gsub: the result would exceed %d bytes", MaxString)
			}
			out.WriteString(s)
		}
		n := 0
		s := 0
		for n < maxN {
			m.ncap = 0
			e := m.match(s, p)
			if e != -1 {
				n++
				m.replace(L, repl, s, e, grow)
			}
			switch {
			case e != -1 && e > s:
				s = e
			case s < len(src):
				grow(src[s : s+1])
				s++
			default:
				s = len(src) + 1
			}
			if s > len(src) || anchored {
				break
			}
		}
		if s < len(src) {
			grow(src[s:])
		}
		L.Push(lua.LString(out.String()))
		L.Push(lua.LNumber(n))
		return 2
	})
}

// replace appends the replacement of the match src[s:e].
func (m *matcher) replace(L *lua.LState, repl lua.LValue, s, e int, grow func(string)) {
	var v lua.LValue
	switch r := repl.(type) {
	case lua.LString, lua.LNumber:
		t := lua.LVAsString(r)
		for {
			m.step()
			i := strings.IndexByte(t, '%')
			if i < 0 || i+1 == len(t) {
				grow(t)
				return
			}
			grow(t[:i])
			switch d := t[i+1]; {
			case d == '0':
				grow(m.src[s:e])
			case d >= '1' && d <= '9':
				grow(lua.LVAsString(m.value(int(d-'1'), s, e)))
			default:
				grow(t[i+1 : i+2])
			}
			t = t[i+2:]
		}
	case *lua.LTable:
		v = L.GetTable(r, m.value(0, s, e))
	case *lua.LFunction:
		// The function may run its own patterns: this match's captures
		// are read before it runs.
		args := make([]lua.LValue, 0, max(m.ncap, 1))
		for i := range max(m.ncap, 1) {
			args = append(args, m.value(i, s, e))
		}
		L.Push(r)
		for _, a := range args {
			L.Push(a)
		}
		L.Call(len(args), 1)
		v = L.Get(-1)
		L.Pop(1)
	}
	switch x := v.(type) {
	case *lua.LNilType:
		grow(m.src[s:e])
	case lua.LBool:
		if !x {
			grow(m.src[s:e])
		} else {
			L.RaiseError("invalid replacement value (a boolean)")
		}
	case lua.LString, lua.LNumber:
		grow(lua.LVAsString(x))
	default:
		L.RaiseError("invalid replacement value (a %s)", v.Type().String())
	}
}
