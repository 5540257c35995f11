package rules

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net/netip"
	"path"
	"reflect"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/policyd-mail/policyd/internal/ratelog"
	"github.com/policyd-mail/policyd/store"
)

// StoreErrorPolicy is what the engine answers when a rule cannot decide.
type StoreErrorPolicy uint8

const (
	// FailOpen treats the failing rule as DECLINED: mail keeps flowing.
	FailOpen StoreErrorPolicy = iota
	// FailTempfail answers DENYSOFT so the client retries later.
	FailTempfail
)

// ParseStoreErrorPolicy reads the --on-store-error value.
func ParseStoreErrorPolicy(v string) (StoreErrorPolicy, error) {
	switch v {
	case "continue", "":
		return FailOpen, nil
	case "tempfail":
		return FailTempfail, nil
	}
	return 0, fmt.Errorf("on-store-error: %q is neither continue nor tempfail", v)
}

// Metrics receives what the engine counts. The Prometheus adapter lives with
// the daemon; tests use counters of their own.
type Metrics interface {
	Decision(protocol string, h Hook, rule string, c Code, dryRun bool)
	HookDuration(protocol string, h Hook, d time.Duration)
	RuleError(rule string, h Hook, kind string) // kind: "store" or "panic"
	// Delayed is a delay a rule asked the front-end to hold a reply for
	// (before the front-end caps it to what the MTA allows).
	Delayed(protocol string, h Hook, rule string, d time.Duration)
	// RuleEvent counts one event of a rule's own (ratelimit's
	// "exceeded"), as policyd_<rule name>_<event>_total{rule}.
	RuleEvent(rule, event string)
}

type noMetrics struct{}

func (noMetrics) Decision(string, Hook, string, Code, bool)   {}
func (noMetrics) HookDuration(string, Hook, time.Duration)    {}
func (noMetrics) RuleError(string, Hook, string)              {}
func (noMetrics) Delayed(string, Hook, string, time.Duration) {}
func (noMetrics) RuleEvent(string, string)                    {}

// Options are what a chain is built with.
type Options struct {
	Store        store.Store
	Clock        Clock
	Logger       *slog.Logger
	OnStoreError StoreErrorPolicy
	DryRun       bool // the daemon's --dry-run: every decision only pretends
	Metrics      Metrics
	// PluginDirs are directories searched for NAME.lua before the config
	// directory's plugins.d (--plugin-dir).
	PluginDirs []string
	// Overlap, when set, watches for one session coming through both
	// front-ends; it outlives reloads.
	Overlap *Overlap
	// ReadAhead sends the connect hook's declared reads (ConnectReader)
	// as the hook starts. Worth it on a store across the network; on the
	// embedded store a read costs less than the goroutine that would
	// send it.
	ReadAhead bool
}

// tempfailText is what a client reads when policyd itself is in trouble
// and the operator chose tempfail over fail-open.
const tempfailText = "Policy service temporarily unavailable, please try again later"

type hookFunc func(ctx context.Context, s *Session) (Result, error)

type entry struct {
	name      string
	pos       Pos
	rule      any
	dryRun    bool
	ovr       override
	effective []string
	log       *slog.Logger
	errLog    *ratelog.Limiter
	// warnOverride says once that code or enhanced did not apply.
	warnOverride sync.Once
	// neverRefuses: see Definition.NeverRefuses.
	neverRefuses bool
}

type override struct {
	code     int
	enhanced string
	text     string
}

// Chain is a built, immutable rule chain. Reload builds a new one aside
// and swaps it; sessions keep the chain they started with.
type Chain struct {
	entries []*entry
	hooks   [numHooks][]*entry
	fns     [numHooks][]hookFunc
	readers []ConnectReader // the connect hook's, with Options.ReadAhead
	opts    Options
	panics  atomic.Int64
	errors  atomic.Int64
}

// Load reads a configuration directory (fsys, shown to the operator as
// dir) and builds the chain. Every problem is returned as ConfigErrors;
// warnings come back even when the chain is good.
func Load(fsys fs.FS, dir string, opts Options) (*Chain, ConfigErrors, error) {
	if opts.Clock == nil {
		opts.Clock = SystemClock{}
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.Metrics == nil {
		opts.Metrics = noMetrics{}
	}
	var errs, warns ConfigErrors
	lines := parsePlugins(fsys, dir, opts.PluginDirs, &errs)
	c := &Chain{opts: opts}
	for _, pl := range lines {
		def := pl.def
		settings := settingsFor(fsys, dir, pl, def, &errs)
		b := newBinder(pl.Name, settings, pl.Pos, &errs, &warns)
		e := &entry{name: pl.Name, pos: pl.Pos, neverRefuses: def.NeverRefuses}
		e.dryRun = b.Bool("dry_run", false)
		e.ovr.code = int(b.Int("code", 0, 400, 599))
		e.ovr.enhanced = b.String("enhanced", "")
		e.ovr.text = b.String("text", "")
		if e.ovr.enhanced != "" && !validEnhanced(e.ovr.enhanced) {
			b.Errorf("enhanced: %q is not an enhanced status code like 4.7.1", e.ovr.enhanced)
		}
		// The common keys are printed only when set, to keep the
		// effective chain readable.
		b.effective = nil
		if e.dryRun {
			b.record("dry_run", true)
		}
		if e.ovr.code != 0 {
			b.record("code", e.ovr.code)
		}
		if e.ovr.enhanced != "" {
			b.record("enhanced", e.ovr.enhanced)
		}
		if e.ovr.text != "" {
			b.record("text", strconv.Quote(e.ovr.text))
		}
		e.log = opts.Logger.With("rule", pl.Name)
		e.errLog = ratelog.New(time.Second)
		before := len(errs)
		rule, err := def.Setup(b, Env{Name: pl.Name, Store: opts.Store, Clock: opts.Clock, Logger: e.log, Metrics: opts.Metrics})
		if err != nil {
			var ce ConfigError
			if errors.As(err, &ce) {
				// A problem in a file of its own (a script's syntax):
				// at that file's line.
				errs = append(errs, ce)
			} else {
				errs = append(errs, ConfigError{Pos: pl.Pos, Msg: pl.Name + ": " + err.Error()})
			}
			continue
		}
		b.finish()
		e.effective = b.effective
		if len(errs) > before {
			continue
		}
		if w := overrideProblem(rule, def, e.ovr); w != "" {
			warns = append(warns, ConfigError{Pos: pl.Pos, Msg: pl.Name + ": " + w, Warning: true})
		}
		e.rule = rule
		c.add(e)
	}
	warns = append(warns, orderProblems(lines)...)
	warns = append(warns, unreadFiles(fsys, dir, lines)...)
	warns = sortErrors(warns)
	if len(errs) > 0 {
		return nil, warns, sortErrors(errs)
	}
	return c, warns, nil
}

// Answerer is a rule that says which refusals it can give, so that a
// code or enhanced override that could never apply to any of them is
// reported at load rather than ignored at run time.
type Answerer interface {
	Answers() []Code
}

// overrideProblem says why the code or enhanced override o never
// applies to the rule's answers, or "" when it may (or the rule does not
// say what it answers).
func overrideProblem(rule any, def Definition, o override) string {
	if o.code == 0 && o.enhanced == "" {
		return ""
	}
	var answers []Code
	if a, ok := rule.(Answerer); ok {
		answers = a.Answers()
	} else if !def.NeverRefuses {
		return ""
	}
	var names []string
	for _, c := range answers {
		r := replyFor(c, "", o)
		if (o.code == 0 || r.CodeSet) && (o.enhanced == "" || r.Enhanced == o.enhanced) {
			return ""
		}
		names = append(names, c.String())
	}
	what := "code"
	if o.code == 0 {
		what = "enhanced"
	} else if o.enhanced != "" {
		what = "code or enhanced"
	}
	if len(names) == 0 {
		return fmt.Sprintf("%s is never used: the rule never refuses", what)
	}
	return fmt.Sprintf("%s never applies: the rule answers only %s, and an override replaces only a code of its own class (4xx for DENYSOFT, 5xx for DENY), never a disconnecting answer's",
		what, strings.Join(names, ", "))
}

// MilterNeeder is a rule that cannot work behind the policy protocol
// alone; NeedsMilter says why, or "" when its settings do not need it.
type MilterNeeder interface {
	NeedsMilter() string
}

// NeedsMilter lists the rules of the chain that need the milter
// front-end, with why, for a daemon or check that knows which
// listeners are on.
func (c *Chain) NeedsMilter() map[string]string {
	out := map[string]string{}
	for _, e := range c.entries {
		if m, ok := e.rule.(MilterNeeder); ok {
			if why := m.NeedsMilter(); why != "" {
				out[e.name] = why
			}
		}
	}
	return out
}

// orderProblems warns, at each plugins line, about a rule placed where
// it cannot work: one whose Needs are not before it, one marked Early
// behind rules it would have exempted.
func orderProblems(lines []PluginLine) ConfigErrors {
	var warns ConfigErrors
	seen := map[string]bool{}
	var firstLate string
	for _, pl := range lines {
		def := pl.def
		for _, need := range def.Needs {
			if !seen[need] {
				warns = append(warns, ConfigError{Pos: pl.Pos, Msg: fmt.Sprintf("%s: needs %s before it in plugins (it reads what %s leaves), or it never acts", pl.Name, need, need)})
			}
		}
		if def.Early && firstLate != "" {
			warns = append(warns, ConfigError{Pos: pl.Pos, Msg: fmt.Sprintf("%s: comes after %s, which it cannot exempt: put it first", pl.Name, firstLate)})
		}
		if !def.Early && firstLate == "" {
			firstLate = pl.Name
		}
		seen[pl.Rule] = true
	}
	return warns
}

// unreadFiles warns about the files of the config directory no rule
// reads: a misspelt rule file, or one per instance ("greylisting:1"),
// whose settings would otherwise be ignored without a word.
func unreadFiles(fsys fs.FS, dir string, lines []PluginLine) ConfigErrors {
	ents, err := fs.ReadDir(fsys, ".")
	if err != nil {
		return nil
	}
	read := map[string]bool{"plugins": true}
	for _, pl := range lines {
		read[pl.Rule] = true
	}
	var warns ConfigErrors
	for _, e := range ents {
		name := e.Name()
		if !e.Type().IsRegular() || read[name] || strings.HasPrefix(name, ".") || strings.HasSuffix(name, "~") ||
			strings.Contains(name, ".dpkg-") || strings.HasSuffix(name, ".bak") || strings.HasSuffix(name, ".orig") {
			continue
		}
		msg := "not read: no rule of that name in plugins"
		if rule, _, ok := strings.Cut(name, ":"); ok && read[rule] {
			msg = fmt.Sprintf("not read: every instance of %s reads the file %s; give an instance its own settings on its plugins line", rule, rule)
		}
		warns = append(warns, ConfigError{Pos: Pos{File: path.Join(dir, name)}, Msg: msg, Warning: true})
	}
	return warns
}

// sortErrors orders problems by file and line, as an editor walks them,
// and drops repeats (two instances of a rule read the same file).
func sortErrors(es ConfigErrors) ConfigErrors {
	sort.SliceStable(es, func(i, j int) bool {
		if es[i].Pos.File != es[j].Pos.File {
			return es[i].Pos.File < es[j].Pos.File
		}
		return es[i].Pos.Line < es[j].Pos.Line
	})
	out := es[:0]
	for i, e := range es {
		if i > 0 && e == es[i-1] {
			continue
		}
		out = append(out, e)
	}
	return out
}

func validEnhanced(s string) bool {
	p := strings.Split(s, ".")
	if len(p) != 3 || (p[0] != "4" && p[0] != "5") {
		return false
	}
	for _, n := range p[1:] {
		if len(n) == 0 || len(n) > 3 || strings.Trim(n, "0123456789") != "" {
			return false
		}
	}
	return true
}

// add files the rule under every hook it implements; the type assertions
// happen once here, not per call.
func (c *Chain) add(e *entry) {
	c.entries = append(c.entries, e)
	r := e.rule
	reg := func(h Hook, f hookFunc) {
		c.hooks[h] = append(c.hooks[h], e)
		c.fns[h] = append(c.fns[h], f)
	}
	if x, ok := r.(Scripted); ok {
		for _, h := range x.Hooks() {
			switch h {
			case HookDeny, HookOK:
				c.hooks[h] = append(c.hooks[h], e)
			default:
				reg(h, func(ctx context.Context, s *Session) (Result, error) { return x.Call(ctx, h, s) })
			}
		}
		return
	}
	if x, ok := r.(ConnectHook); ok {
		reg(HookConnect, x.Connect)
		// Not in a global trial: there the observers run in the middle
		// of the connect hook (a would-be refusal does not end it), and
		// client_stats' and deny_repeat_offenders' own observers write
		// the records the rules after them read. ReadAhead matches a
		// reader by comparing it, so its type must be comparable.
		if y, ok := r.(ConnectReader); ok && c.opts.ReadAhead && !c.opts.DryRun && reflect.TypeOf(y).Comparable() {
			c.readers = append(c.readers, y)
		}
	}
	if x, ok := r.(HeloHook); ok {
		reg(HookHelo, x.Helo)
	}
	if x, ok := r.(MailHook); ok {
		reg(HookMail, x.Mail)
	}
	if x, ok := r.(RcptHook); ok {
		reg(HookRcpt, x.Rcpt)
	}
	if x, ok := r.(DataHook); ok {
		reg(HookData, x.Data)
	}
	if x, ok := r.(DataPostHook); ok {
		reg(HookDataPost, x.DataPost)
	}
	if x, ok := r.(ResetHook); ok {
		reg(HookResetTransaction, func(ctx context.Context, s *Session) (Result, error) { return Result{}, x.ResetTransaction(ctx, s) })
	}
	if x, ok := r.(DisconnectHook); ok {
		reg(HookDisconnect, func(ctx context.Context, s *Session) (Result, error) { return Result{}, x.Disconnect(ctx, s) })
	}
	if _, ok := r.(DenyObserver); ok {
		c.hooks[HookDeny] = append(c.hooks[HookDeny], e)
	}
	if _, ok := r.(OKObserver); ok {
		c.hooks[HookOK] = append(c.hooks[HookOK], e)
	}
}

// Rules lists the instance names in order.
func (c *Chain) Rules() []string {
	out := make([]string, len(c.entries))
	for i, e := range c.entries {
		out[i] = e.name
	}
	return out
}

// ClientKeyer is a rule that keeps records about clients, under the
// keys it declares (the admin API's forget finds them by their network).
type ClientKeyer interface {
	ClientKeys() store.Keys
}

// ClientIPv6Prefix is the widest network any rule of the chain counts an
// IPv6 client by (ipv6_prefix): forgetting an IPv6 address forgets the
// records of that network. DefaultIPv6Prefix when no rule counts clients.
func (c *Chain) ClientIPv6Prefix() int {
	bits := 0
	for _, e := range c.entries {
		if k, ok := e.rule.(ClientKeyer); ok {
			if b := k.ClientKeys().IPv6Prefix(); bits == 0 || b < bits {
				bits = b
			}
		}
	}
	if bits == 0 {
		return DefaultIPv6Prefix
	}
	return bits
}

// RecordQuery is what an admin asks about: a client, and optionally
// the sender and recipient of a message from it (to find a greylist
// triplet among its records).
type RecordQuery struct {
	Client    netip.Addr // invalid when the question is about a network
	Sender    string
	Recipient string
}

// RecordDescriber is a rule whose stored values need reading for an
// admin: it says in words what one of its records means (a greylist
// entry's state and times rather than "g:1733..."), and "" for a record
// it has nothing to add to.
type RecordDescriber interface {
	DescribeRecord(r store.Record, q RecordQuery, now time.Time) string
}

// DescribeRecord is what the rule instance that wrote r says about it,
// or "" when that rule is not in the chain or says nothing.
func (c *Chain) DescribeRecord(r store.Record, q RecordQuery, now time.Time) string {
	for _, e := range c.entries {
		if e.name != r.Rule {
			continue
		}
		if d, ok := e.rule.(RecordDescriber); ok {
			return d.DescribeRecord(r, q, now)
		}
		return ""
	}
	return ""
}

// Delayer is a rule that holds replies: it says the longest it may ask
// for, so the daemon can compare it with what a protocol allows.
type Delayer interface {
	MaxDelay() time.Duration
}

// MaxDelays lists the rules of the chain that delay, with their longest.
func (c *Chain) MaxDelays() map[string]time.Duration {
	out := map[string]time.Duration{}
	for _, e := range c.entries {
		if d, ok := e.rule.(Delayer); ok {
			out[e.name] = d.MaxDelay()
		}
	}
	return out
}

// RulesAt lists the rules of the chain that answer at hook h.
func (c *Chain) RulesAt(h Hook) []string {
	var out []string
	for _, e := range c.hooks[h] {
		out = append(out, e.name)
	}
	return out
}

// Describe prints the effective chain: one rule per line, with every
// setting it uses, defaults included.
func (c *Chain) Describe() string {
	var b strings.Builder
	for i, e := range c.entries {
		hooks := []string{}
		for h := Hook(0); h < numHooks; h++ {
			for _, x := range c.hooks[h] {
				if x == e {
					hooks = append(hooks, h.String())
				}
			}
		}
		fmt.Fprintf(&b, "%d. %s (%s) hooks=%s", i+1, e.name, e.pos, strings.Join(hooks, ","))
		for _, kv := range e.effective {
			b.WriteString(" ")
			b.WriteString(kv)
		}
		b.WriteString("\n")
	}
	return b.String()
}
