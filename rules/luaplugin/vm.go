package luaplugin

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"strings"
	"time"

	lua "github.com/yuin/gopher-lua"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/store"
)

// MaxString caps a string string.rep may build: one call of it is one
// instruction, so the time budget alone would let string.rep("x", 1e9)
// through.
const MaxString = 1 << 20

// forbidden are the globals a script must not have: files, processes,
// code loading, the debug library, and the environment's own escape
// hatches. now() is the clock.
var forbidden = []string{"dofile", "loadfile", "load", "loadstring", "require", "module", "collectgarbage",
	"getfenv", "setfenv", "newproxy", "_printregs", "print", "io", "os", "debug", "package", "channel", "coroutine"}

// openSandbox opens the libraries a script may use, with the functions
// that could outgrow a call's budget replaced by bounded ones.
func openSandbox(L *lua.LState) {
	for _, lib := range []struct {
		name string
		open lua.LGFunction
	}{{lua.BaseLibName, lua.OpenBase}, {lua.TabLibName, lua.OpenTable}, {lua.StringLibName, lua.OpenString}, {lua.MathLibName, lua.OpenMath}} {
		L.Push(L.NewFunction(lib.open))
		L.Push(lua.LString(lib.name))
		L.Call(1, 0)
	}
	for _, g := range forbidden {
		L.SetGlobal(g, lua.LNil)
	}
	if str, ok := L.GetGlobal("string").(*lua.LTable); ok {
		L.SetFuncs(str, map[string]lua.LGFunction{"rep": strRep, "find": strFind, "match": strMatch, "gmatch": strGmatch, "gsub": strGsub})
		if fn, ok := str.RawGetString("format").(*lua.LFunction); ok && fn.IsG {
			str.RawSetString("format", L.NewFunction(boundedFormat(fn)))
		}
	}
	if tbl, ok := L.GetGlobal("table").(*lua.LTable); ok {
		tbl.RawSetString("concat", L.NewFunction(tableConcat))
	}
	L.SetGlobal("unpack", L.NewFunction(unpack))
	L.SetGlobal(concatName, L.NewFunction(concat))
}

// vm is one Lua state of an instance's pool, with what its API functions
// need during a call.
type vm struct {
	p *Plugin
	L *lua.LState
	// notesMeta makes session and transaction notes read and write the
	// Go notes, shared with Go rules.
	notesMeta *lua.LTable

	// During a call.
	ctx         context.Context
	call        *budget
	s           *rules.Session
	storeErr    error
	storeCalls  int
	registering bool
	// given are the notes userdata handed to the script during the call:
	// cut loose at its end, so a global that kept one cannot reach
	// another session's notes.
	given []*lua.LUserData
}

// maxStoreCalls bounds a hook call's store calls. The script's clock
// stops while one waits, so without it a loop of store calls would run
// as long as the store answers; with it a hook waits at most
// maxStoreCalls × --store-timeout, and maxStoreWait in all.
const maxStoreCalls = 100

// maxStoreWait bounds the wall-clock time a hook call spends in store
// calls, however fast each one is.
const maxStoreWait = time.Second

var errStoreWait = fmt.Errorf("the hook's store calls waited past %v together", maxStoreWait)

func (p *Plugin) newVM() (*vm, error) {
	L := lua.NewState(lua.Options{SkipOpenLibs: true, CallStackSize: 200, RegistrySize: 1024, RegistryMaxSize: 64 * 1024})
	v := &vm{p: p, L: L}
	openSandbox(L)
	for c := rules.Declined; c <= rules.DenySoftDisconnect; c++ {
		L.SetGlobal(c.String(), lua.LNumber(c))
	}
	L.SetGlobal("store", L.SetFuncs(L.NewTable(), map[string]lua.LGFunction{
		"incr": v.storeIncr, "get": v.storeGet, "set": v.storeSet, "delete": v.storeDelete,
	}))
	L.SetGlobal("config", L.SetFuncs(L.NewTable(), map[string]lua.LGFunction{"list": v.configList}))
	L.SetGlobal("net", L.SetFuncs(L.NewTable(), map[string]lua.LGFunction{"contains": netContains, "prefix": netPrefix}))
	L.SetGlobal("log", L.SetFuncs(L.NewTable(), map[string]lua.LGFunction{"info": v.logInfo, "warn": v.logWarn}))
	L.SetGlobal("now", L.NewFunction(v.now))
	v.notesMeta = L.SetFuncs(L.NewTable(), map[string]lua.LGFunction{"__index": notesGet, "__newindex": notesSet})

	// The file and register run under a budget too: a script whose top
	// level loops must not hang a reload.
	call := newBudget(context.Background(), max(p.timeout, time.Second))
	defer call.stop()
	v.begin(context.Background(), call, nil)
	v.registering = true
	defer func() { v.registering = false; v.end() }()
	L.SetContext(call)
	defer L.RemoveContext()
	L.Push(L.NewFunctionFromProto(p.proto))
	if err := L.PCall(0, 0, nil); err != nil {
		L.Close()
		return nil, fmt.Errorf("%s: %s", p.display, loadError(err, call))
	}
	if reg, ok := L.GetGlobal("register").(*lua.LFunction); ok {
		args := L.NewTable()
		for k, val := range p.args {
			args.RawSetString(k, lua.LString(val))
		}
		if err := L.CallByParam(lua.P{Fn: reg, NRet: 0, Protect: true}, args); err != nil {
			L.Close()
			return nil, fmt.Errorf("register: %s", loadError(err, call))
		}
	}
	return v, nil
}

func loadError(err error, call *budget) string {
	if call.overran() {
		return "did not finish within its budget"
	}
	var le *lua.ApiError
	if errors.As(err, &le) {
		return firstFrame(le)
	}
	return err.Error()
}

func (v *vm) begin(ctx context.Context, call *budget, s *rules.Session) {
	v.ctx, v.call, v.s, v.storeErr, v.storeCalls = ctx, call, s, nil, 0
}

func (v *vm) end() {
	v.ctx, v.call, v.s = nil, nil, nil
	for _, ud := range v.given {
		ud.Value = nil
	}
	v.given = v.given[:0]
}

// answer reads a hook's return values: an answer constant (nil is
// DECLINED) and an optional text.
func (v *vm) answer() (rules.Result, error) {
	code, text := v.L.Get(-2), v.L.Get(-1)
	v.L.Pop(2)
	var res rules.Result
	switch c := code.(type) {
	case *lua.LNilType:
		return res, nil
	case lua.LNumber:
		if float64(c) != float64(int(c)) || int(c) < int(rules.Declined) || int(c) > int(rules.DenySoftDisconnect) {
			return res, fmt.Errorf("%s: answered %v, which is no answer constant", v.p.display, c)
		}
		res.Code = rules.Code(int(c))
	default:
		return res, fmt.Errorf("%s: answered a %s, not an answer constant (DECLINED, OK, DONE, DENY, DENYSOFT, DENY_DISCONNECT, DENYSOFT_DISCONNECT)", v.p.display, code.Type())
	}
	switch t := text.(type) {
	case *lua.LNilType:
	case lua.LString:
		res.Text = rules.CleanText(string(t))
	default:
		res.Text = rules.CleanText(text.String())
	}
	return res, nil
}

// sessionValue is the session as the script sees it (SPEC §9).
func (v *vm) sessionValue(s *rules.Session) lua.LValue {
	L := v.L
	t := L.CreateTable(0, 10)
	if s.Client.IsValid() {
		t.RawSetString("remote_ip", lua.LString(s.Client.String()))
	}
	t.RawSetString("remote_port", lua.LNumber(s.ClientPort))
	if s.Local.IsValid() {
		t.RawSetString("local_ip", lua.LString(s.Local.String()))
	}
	if s.ClientName != "" && s.ClientName != "unknown" {
		t.RawSetString("remote_host", lua.LString(s.ClientName))
	}
	t.RawSetString("helo", lua.LString(s.Helo))
	if s.AuthUser != "" {
		t.RawSetString("auth_user", lua.LString(s.AuthUser))
	}
	t.RawSetString("notes", v.notes(&s.Notes))
	if s.Txn != nil {
		if s.Txn.QueueID != "" {
			t.RawSetString("queue_id", lua.LString(s.Txn.QueueID))
		}
		txn := L.CreateTable(0, 6)
		txn.RawSetString("sender", lua.LString(strings.Trim(s.Txn.Sender, "<>")))
		if s.Txn.Rcpt != "" {
			txn.RawSetString("rcpt", lua.LString(strings.Trim(s.Txn.Rcpt, "<>")))
		}
		rcpts := L.CreateTable(len(s.Txn.Rcpts), 0)
		for _, r := range s.Txn.Rcpts {
			rcpts.Append(lua.LString(strings.Trim(r, "<>")))
		}
		txn.RawSetString("recipients", rcpts)
		if s.Txn.Size > 0 {
			txn.RawSetString("size", lua.LNumber(s.Txn.Size))
		}
		txn.RawSetString("notes", v.notes(&s.Txn.Notes))
		t.RawSetString("txn", txn)
	}
	return t
}

func (v *vm) decisionValue(d rules.Decision) lua.LValue {
	t := v.L.CreateTable(0, 4)
	t.RawSetString("rule", lua.LString(d.Rule))
	t.RawSetString("hook", lua.LString(d.Hook.String()))
	t.RawSetString("answer", lua.LNumber(d.Code))
	t.RawSetString("text", lua.LString(d.Text))
	return t
}

func (v *vm) notes(n *rules.Notes) lua.LValue {
	ud := v.L.NewUserData()
	ud.Value = n
	ud.Metatable = v.notesMeta
	v.given = append(v.given, ud)
	return ud
}

// notesOf is the notes behind a notes userdata, while its call lasts.
func notesOf(L *lua.LState) *rules.Notes {
	n, ok := L.CheckUserData(1).Value.(*rules.Notes)
	if !ok {
		L.RaiseError("these notes belonged to an earlier hook call: read s.notes and s.txn.notes anew in each hook")
	}
	return n
}

func notesGet(L *lua.LState) int {
	n := notesOf(L)
	switch x := n.Get(L.CheckString(2)).(type) {
	case nil:
		L.Push(lua.LNil)
	case string:
		L.Push(lua.LString(x))
	case bool:
		L.Push(lua.LBool(x))
	case int:
		L.Push(lua.LNumber(x))
	case int64:
		L.Push(lua.LNumber(x))
	case float64:
		L.Push(lua.LNumber(x))
	case fmt.Stringer:
		L.Push(lua.LString(x.String()))
	default:
		L.Push(lua.LString(fmt.Sprint(x)))
	}
	return 1
}

// notesSet stores strings, numbers and booleans as Go values a Go rule
// reads back as such (a number as float64, an integral one as int64).
func notesSet(L *lua.LState) int {
	n := notesOf(L)
	key := L.CheckString(2)
	switch x := L.Get(3).(type) {
	case *lua.LNilType:
		n.Set(key, nil)
	case lua.LString:
		n.Set(key, string(x))
	case lua.LBool:
		n.Set(key, bool(x))
	case lua.LNumber:
		if f := float64(x); f == float64(int64(f)) {
			n.Set(key, int64(f))
		} else {
			n.Set(key, f)
		}
	default:
		L.ArgError(3, "a note is a string, a number or a boolean")
	}
	return 0
}

// strRep is string.rep with MaxString.
func strRep(L *lua.LState) int {
	s := L.CheckString(1)
	n := L.CheckInt(2)
	if n <= 0 || s == "" {
		L.Push(lua.LString(""))
		return 1
	}
	if n > MaxString/len(s) {
		L.RaiseError("string.rep: the result would exceed %d bytes", MaxString)
	}
	L.Push(lua.LString(strings.Repeat(s, n)))
	return 1
}

// storeKey is a script's key in the store: namespaced by the instance,
// and filed under the client when it starts with an address or network
// and a colon, so inspect and forget find it.
func (v *vm) storeKey(L *lua.LState, k string) string {
	if k == "" || len(k) > 1024 {
		L.ArgError(1, "a key is 1 to 1024 bytes")
	}
	for i := strings.LastIndexByte(k, ':'); i > 0; i = strings.LastIndexByte(k[:i], ':') {
		head, rest := k[:i], k[i+1:]
		if rest == "" {
			continue
		}
		if a, err := netip.ParseAddr(head); err == nil {
			// Filed as every rule files a client (an IPv6 one under its
			// network), so inspect and forget of the client find it.
			return v.p.keys.Client(a.Unmap(), "script", store.ValueSeg("key", rest))
		}
		if p, err := netip.ParsePrefix(head); err == nil {
			return v.p.keys.Under(p.Masked(), "script", store.ValueSeg("key", rest))
		}
	}
	return v.p.keys.Value("key", k, "script")
}

// storeCall runs a store operation with the script's clock stopped, and
// turns a failure into a Lua error the call reports as a store error.
func (v *vm) storeCall(L *lua.LState, op func(ctx context.Context) error) {
	if v.ctx == nil || v.registering {
		L.RaiseError("store.* is for hooks, not for the file's top level or register")
	}
	if v.storeCalls++; v.storeCalls > maxStoreCalls {
		L.RaiseError("store: more than %d store calls in one hook call", maxStoreCalls)
	}
	v.call.pause()
	err := op(v.ctx)
	v.call.resume()
	if err != nil {
		v.storeErr = err
		L.RaiseError("store: %v", err)
	}
}

func (v *vm) storeIncr(L *lua.LState) int {
	key := v.storeKey(L, L.CheckString(1))
	ttl := seconds(L, 2)
	by := int64(L.OptInt64(3, 1))
	var n int64
	v.storeCall(L, func(ctx context.Context) error {
		var err error
		n, err = v.p.store.Incr(ctx, key, by, ttl)
		return err
	})
	L.Push(lua.LNumber(n))
	return 1
}

func (v *vm) storeGet(L *lua.LState) int {
	key := v.storeKey(L, L.CheckString(1))
	var val []byte
	var ok bool
	v.storeCall(L, func(ctx context.Context) error {
		var err error
		val, ok, err = v.p.store.Get(ctx, key)
		return err
	})
	if !ok {
		L.Push(lua.LNil)
	} else {
		L.Push(lua.LString(val))
	}
	return 1
}

func (v *vm) storeSet(L *lua.LState) int {
	key := v.storeKey(L, L.CheckString(1))
	val := L.CheckString(2)
	if len(val) > MaxString {
		L.ArgError(2, "a value is at most 1 MiB")
	}
	ttl := seconds(L, 3)
	v.storeCall(L, func(ctx context.Context) error { return v.p.store.Set(ctx, key, []byte(val), ttl) })
	return 0
}

func (v *vm) storeDelete(L *lua.LState) int {
	key := v.storeKey(L, L.CheckString(1))
	v.storeCall(L, func(ctx context.Context) error { return v.p.store.Delete(ctx, key) })
	return 0
}

func seconds(L *lua.LState, n int) time.Duration {
	s := float64(L.CheckNumber(n))
	if s < 0 || s > 10*365*24*3600 {
		L.ArgError(n, "a ttl is 0 (no expiry) to ten years, in seconds")
	}
	return time.Duration(s * float64(time.Second))
}

// configList is config.list(name): the meaningful lines of a file of the
// config directory, read once per load and shared by every VM.
func (v *vm) configList(L *lua.LState) int {
	if !v.registering {
		L.RaiseError("config.list is for register: files are read once, at load")
	}
	name := L.CheckString(1)
	if !fs.ValidPath(name) || strings.Contains(name, "/") {
		L.ArgError(1, "a file of the config directory, by its name")
	}
	p := v.p
	p.listsMu.Lock()
	lines, ok := p.lists[name]
	if !ok {
		data, err := fs.ReadFile(p.cfg, name)
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			p.listsMu.Unlock()
			L.RaiseError("config.list(%q): %v", name, err)
		}
		for _, line := range strings.Split(string(data), "\n") {
			line = strings.TrimSpace(line)
			if line != "" && !strings.HasPrefix(line, "#") {
				lines = append(lines, line)
			}
		}
		p.lists[name] = lines
	}
	p.listsMu.Unlock()
	t := L.CreateTable(len(lines), 0)
	for _, line := range lines {
		t.Append(lua.LString(line))
	}
	L.Push(t)
	return 1
}

func netContains(L *lua.LState) int {
	p, err := rules.ParsePrefix(L.CheckString(1))
	if err != nil {
		L.ArgError(1, err.Error())
	}
	a, err := netip.ParseAddr(L.CheckString(2))
	L.Push(lua.LBool(err == nil && p.Contains(a.Unmap())))
	return 1
}

func netPrefix(L *lua.LState) int {
	a, err := netip.ParseAddr(L.CheckString(1))
	if err != nil {
		L.ArgError(1, "not an IP address")
	}
	a = a.Unmap()
	bits := L.CheckInt(2)
	p, err := a.Prefix(bits)
	if err != nil {
		L.ArgError(2, fmt.Sprintf("a prefix length of 0 to %d", a.BitLen()))
	}
	L.Push(lua.LString(p.String()))
	return 1
}

func (v *vm) logInfo(L *lua.LState) int {
	v.p.log.Info(L.CheckString(1), v.logAttrs()...)
	return 0
}

func (v *vm) logWarn(L *lua.LState) int {
	v.p.log.Warn(L.CheckString(1), v.logAttrs()...)
	return 0
}

func (v *vm) logAttrs() []any {
	if v.s == nil {
		return []any{"script", v.p.display}
	}
	return []any{"script", v.p.display, "client", v.s.Client.String()}
}

func (v *vm) now(L *lua.LState) int {
	t := v.p.clock.Now()
	L.Push(lua.LNumber(float64(t.UnixNano()) / 1e9))
	return 1
}
