// Package luaplugin runs the admin's own rules, written in Lua 5.1 (SPEC
// §9): a script plugins.d/NAME.lua listed in plugins as NAME is a rule
// like the built-in ones, with qpsmtpd's hook names and answers. Each
// rule instance keeps a pool of VMs, so concurrent sessions never share a
// Lua state; every hook call runs under a time budget, and a VM that
// failed or overran is thrown away.
package luaplugin

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"strings"
	"sync"
	"time"

	lua "github.com/yuin/gopher-lua"
	"github.com/yuin/gopher-lua/parse"

	"github.com/policyd-mail/policyd/internal/ratelog"
	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/store"
)

func init() {
	rules.RegisterScriptEngine(engine{})
}

type engine struct{}

// Definition compiles nothing yet: the script is compiled by Setup, so a
// syntax error is reported like any config error, at load and by check.
func (engine) Definition(src rules.ScriptSource) rules.Definition {
	return rules.Definition{
		Name:  src.Name,
		Setup: func(b *rules.Binder, env rules.Env) (any, error) { return setup(src, b, env) },
	}
}

// DefaultTimeout is a hook call's budget of the script's own running time.
const DefaultTimeout = 50 * time.Millisecond

// hookNames are the script functions of each hook.
var hookNames = []struct {
	fn   string
	hook rules.Hook
}{
	{"hook_connect", rules.HookConnect},
	{"hook_helo", rules.HookHelo},
	{"hook_mail", rules.HookMail},
	{"hook_rcpt", rules.HookRcpt},
	{"hook_data", rules.HookData},
	{"hook_data_post", rules.HookDataPost},
	{"hook_reset_transaction", rules.HookResetTransaction},
	{"hook_disconnect", rules.HookDisconnect},
	{"hook_deny", rules.HookDeny},
	{"hook_ok", rules.HookOK},
}

// Plugin is one instance of a script.
type Plugin struct {
	name    string
	display string // plugins.d/NAME.lua
	proto   *lua.FunctionProto
	args    map[string]string
	lists   map[string][]string // config.list, read at load
	cfg     fs.FS
	timeout time.Duration
	store   store.Store
	clock   rules.Clock
	log     *slog.Logger
	errLog  *ratelog.Limiter
	keys    store.Keys
	hooks   []rules.Hook
	fns     map[rules.Hook]string

	// listsMu guards lists while a VM's register reads a file for the
	// first time; afterwards every VM sees the same lines.
	listsMu sync.Mutex
	pool    chan *vm
}

var _ rules.Scripted = (*Plugin)(nil)

// poolSize bounds the idle VMs kept per instance: more run at once when
// more sessions need them, and the extra ones are dropped after use.
const poolSize = 64

func setup(src rules.ScriptSource, b *rules.Binder, env rules.Env) (any, error) {
	p := &Plugin{
		name:    env.Name,
		display: src.Display,
		cfg:     src.Config,
		timeout: b.Duration("timeout", DefaultTimeout, time.Millisecond, 10*time.Second),
		store:   env.Store,
		clock:   env.Clock,
		log:     env.Logger,
		errLog:  ratelog.New(time.Second),
		keys:    store.NewKeys(env.Name, rules.DefaultIPv6Prefix),
		args:    map[string]string{},
		lists:   map[string][]string{},
		fns:     map[rules.Hook]string{},
		pool:    make(chan *vm, poolSize),
	}
	for _, s := range b.Unread() {
		p.args[s.Key] = s.Value
	}
	chunk, err := parse.Parse(bytes.NewReader(src.Code), src.Display)
	if err != nil {
		return nil, scriptSyntax(src.Display, err)
	}
	boundConcat(chunk)
	p.proto, err = lua.Compile(chunk, src.Display)
	if err != nil {
		return nil, scriptSyntax(src.Display, err)
	}
	// The first VM runs register: its errors are the config's, and it
	// tells which hooks the script defines.
	v, err := p.newVM()
	if err != nil {
		return nil, err
	}
	for _, h := range hookNames {
		if _, ok := v.L.GetGlobal(h.fn).(*lua.LFunction); ok {
			p.hooks = append(p.hooks, h.hook)
			p.fns[h.hook] = h.fn
		}
	}
	if len(p.hooks) == 0 {
		return nil, fmt.Errorf("%s defines no hook function (hook_connect, hook_helo, hook_mail, hook_rcpt, hook_data, hook_data_post, hook_reset_transaction, hook_disconnect, hook_deny, hook_ok)", src.Display)
	}
	p.put(v)
	return p, nil
}

// scriptSyntax is a compile error at the script's line:
// "config/plugins.d/NAME.lua:LINE: message".
func scriptSyntax(display string, err error) error {
	var pe *parse.Error
	if errors.As(err, &pe) {
		msg := pe.Message
		if pe.Token != "" {
			msg += " near '" + pe.Token + "'"
		}
		return rules.ConfigError{Pos: rules.Pos{File: display, Line: pe.Pos.Line}, Msg: msg}
	}
	return rules.ConfigError{Pos: rules.Pos{File: display}, Msg: err.Error()}
}

// Hooks lists the hooks the script defines (rules.Scripted).
func (p *Plugin) Hooks() []rules.Hook { return p.hooks }

// get takes an idle VM, or makes one.
func (p *Plugin) get() (*vm, error) {
	select {
	case v := <-p.pool:
		return v, nil
	default:
		return p.newVM()
	}
}

// put returns a VM that finished its call cleanly.
func (p *Plugin) put(v *vm) {
	select {
	case p.pool <- v:
	default:
		v.L.Close()
	}
}

// Call runs the script's function for hook h (rules.Scripted).
func (p *Plugin) Call(ctx context.Context, h rules.Hook, s *rules.Session) (rules.Result, error) {
	var res rules.Result
	err := p.run(ctx, h, s, nil, &res)
	return res, err
}

// Observe runs hook_deny or hook_ok with the decision (rules.Scripted).
func (p *Plugin) Observe(ctx context.Context, h rules.Hook, s *rules.Session, d rules.Decision) error {
	return p.run(ctx, h, s, &d, nil)
}

// ScriptError is a script that failed or overran its budget: a rule
// error of kind "script".
type ScriptError struct{ Msg string }

func (e *ScriptError) Error() string { return e.Msg }

// RuleErrorKind is "script" (rules.KindError).
func (e *ScriptError) RuleErrorKind() string { return "script" }

func (p *Plugin) run(ctx context.Context, h rules.Hook, s *rules.Session, d *rules.Decision, res *rules.Result) error {
	fn := p.fns[h]
	if fn == "" {
		return nil
	}
	v, err := p.get()
	if err != nil {
		return &ScriptError{Msg: err.Error()}
	}
	ctx, cancel := context.WithTimeoutCause(ctx, p.timeout+maxStoreWait, errStoreWait)
	defer cancel()
	call := newBudget(ctx, p.timeout)
	defer call.stop()
	v.begin(ctx, call, s)
	args := []lua.LValue{v.sessionValue(s)}
	if d != nil {
		args = append(args, v.decisionValue(*d))
	}
	v.L.SetContext(call)
	err = v.L.CallByParam(lua.P{Fn: v.L.GetGlobal(fn), NRet: 2, Protect: true}, args...)
	v.L.RemoveContext()
	v.end()
	if err != nil {
		// The VM may be anywhere: half a table built, a loop cut short.
		v.L.Close()
		if v.storeErr != nil {
			// A store failure is a store error, as for a Go rule.
			if errors.Is(context.Cause(ctx), errStoreWait) {
				return fmt.Errorf("%s: %w (%w)", p.display, errStoreWait, v.storeErr)
			}
			return fmt.Errorf("%s: %w", p.display, v.storeErr)
		}
		return p.scriptError(h, s, call, err)
	}
	if res != nil {
		*res, err = v.answer()
		if err != nil {
			v.L.Close()
			return p.scriptError(h, s, call, err)
		}
	}
	v.L.SetTop(0)
	p.put(v)
	return nil
}

// scriptError logs (at a bounded rate) and wraps a failed call.
func (p *Plugin) scriptError(h rules.Hook, s *rules.Session, call *budget, err error) error {
	msg := err.Error()
	switch {
	case call.overran():
		msg = fmt.Sprintf("%s: %s stopped after its budget of %v (timeout)", p.display, hookNameOf(h), p.timeout)
	case errors.Is(context.Cause(call), errStoreWait):
		msg = fmt.Sprintf("%s: %s stopped: %v", p.display, hookNameOf(h), errStoreWait)
	case call.overgrew():
		msg = fmt.Sprintf("%s: %s stopped: the process's heap grew past the scripts' allowance", p.display, hookNameOf(h))
	default:
		var le *lua.ApiError
		if errors.As(err, &le) {
			msg = firstFrame(le)
		}
	}
	if n, ok := p.errLog.Allow(p.clock.Now()); ok {
		p.log.Warn("script failed", "hook", h.String(), "client", s.Client.String(), "err", msg, "suppressed", n)
	}
	return &ScriptError{Msg: msg}
}

func hookNameOf(h rules.Hook) string {
	for _, n := range hookNames {
		if n.hook == h {
			return n.fn
		}
	}
	return h.String()
}

// firstFrame is a runtime error as "plugins.d/NAME.lua:LINE: message",
// without the rest of the traceback.
func firstFrame(e *lua.ApiError) string {
	msg := e.Object.String()
	if i := strings.IndexByte(msg, '\n'); i >= 0 {
		msg = msg[:i]
	}
	return msg
}
