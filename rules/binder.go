package rules

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Pos is where a configuration value came from.
type Pos struct {
	File string
	Line int
}

func (p Pos) String() string {
	if p.File == "" {
		return "built-in"
	}
	if p.Line == 0 {
		return p.File
	}
	return p.File + ":" + strconv.Itoa(p.Line)
}

// ConfigError is one problem in the configuration, always with its place.
type ConfigError struct {
	Pos     Pos
	Msg     string
	Warning bool
}

func (e ConfigError) Error() string {
	if e.Warning {
		return e.Pos.String() + ": warning: " + e.Msg
	}
	return e.Pos.String() + ": " + e.Msg
}

// ConfigErrors collects every problem found, so an operator fixes them all
// in one round instead of one per restart.
type ConfigErrors []ConfigError

func (es ConfigErrors) Error() string {
	lines := make([]string, len(es))
	for i, e := range es {
		lines[i] = e.Error()
	}
	return strings.Join(lines, "\n")
}

// Setting is one "key value" pair given to a rule.
type Setting struct {
	Key   string
	Value string
	Pos   Pos
}

// Binder hands a rule its settings by key and type. Keys a rule never asks
// for are reported as unknown, and every error carries file:line, so a rule
// author cannot forget either.
type Binder struct {
	rule     string
	settings []Setting
	used     []bool
	errs     *ConfigErrors
	warns    *ConfigErrors
	linePos  Pos // the plugins line, for errors not tied to one setting
	// effective records every value a rule asked for, defaults included,
	// for the start-up print and `policyd check`.
	effective []string
}

func (b *Binder) record(key string, v any) {
	b.effective = append(b.effective, fmt.Sprintf("%s=%v", key, v))
}

func newBinder(rule string, settings []Setting, at Pos, errs, warns *ConfigErrors) *Binder {
	return &Binder{rule: rule, settings: settings, used: make([]bool, len(settings)), errs: errs, warns: warns, linePos: at}
}

// Errorf reports a problem at the rule's plugins line.
func (b *Binder) Errorf(format string, args ...any) {
	*b.errs = append(*b.errs, ConfigError{Pos: b.linePos, Msg: b.rule + ": " + fmt.Sprintf(format, args...)})
}

func (b *Binder) errAt(s Setting, format string, args ...any) {
	what := b.rule + ": "
	if s.Key != "" {
		what += s.Key + ": "
	}
	*b.errs = append(*b.errs, ConfigError{Pos: s.Pos, Msg: what + fmt.Sprintf(format, args...)})
}

// last returns the effective setting for a scalar key: the plugins line is
// read after the rule's file, so it wins. A scalar key given twice in one
// place is a mistake worth reporting, not a silent last-one-wins.
func (b *Binder) last(key string) (Setting, bool) {
	found := -1
	for i, s := range b.settings {
		if s.Key != key {
			continue
		}
		b.used[i] = true
		if found >= 0 && b.settings[found].Pos.File == s.Pos.File {
			b.errAt(s, "set again (first at line %d)", b.settings[found].Pos.Line)
		}
		found = i
	}
	if found < 0 {
		return Setting{}, false
	}
	return b.settings[found], true
}

// all returns every setting for a list key, in order.
func (b *Binder) all(key string) []Setting {
	var out []Setting
	for i, s := range b.settings {
		if s.Key == key {
			b.used[i] = true
			out = append(out, s)
		}
	}
	return out
}

// Int binds a whole number in [min, max].
func (b *Binder) Int(key string, def, min, max int64) (v int64) {
	defer func() { b.record(key, v) }()
	s, ok := b.last(key)
	if !ok {
		return def
	}
	n, err := strconv.ParseInt(s.Value, 10, 64)
	if err != nil {
		b.errAt(s, "%q is not a whole number", s.Value)
		return def
	}
	if n < min || n > max {
		b.errAt(s, "%d is out of range [%d, %d]", n, min, max)
		return def
	}
	return n
}

// IPv6Prefix binds ipv6_prefix: the network an IPv6 client is counted
// by (store.ClientNet), the same setting for every rule that counts clients.
func (b *Binder) IPv6Prefix() int {
	return int(b.Int("ipv6_prefix", DefaultIPv6Prefix, 16, 128))
}

// DefaultIPv6Prefix is ipv6_prefix's default: one host usually owns a /64.
const DefaultIPv6Prefix = 64

// Duration binds a duration. A bare number is seconds, as in the qpsmtpd
// seeds ("exptime 60"); Go forms ("90s", "12h") work too.
func (b *Binder) Duration(key string, def, min, max time.Duration) (v time.Duration) {
	defer func() { b.record(key, v) }()
	s, ok := b.last(key)
	if !ok {
		return def
	}
	d, err := ParseDuration(s.Value)
	if err != nil {
		b.errAt(s, "%v", err)
		return def
	}
	if d < min || d > max {
		b.errAt(s, "%v is out of range [%v, %v]", d, min, max)
		return def
	}
	return d
}

// ParseDuration reads seconds ("60") or a Go duration ("1m30s").
func ParseDuration(v string) (time.Duration, error) {
	if n, err := strconv.ParseInt(v, 10, 64); err == nil {
		if n < 0 || n > int64(1<<62/time.Second) {
			return 0, fmt.Errorf("%q is not a valid number of seconds", v)
		}
		return time.Duration(n) * time.Second, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil {
		return 0, fmt.Errorf("%q is not a duration (seconds, or like 90s, 15m, 12h)", v)
	}
	return d, nil
}

// Bool binds 1/0, yes/no, true/false, on/off.
func (b *Binder) Bool(key string, def bool) (v bool) {
	defer func() { b.record(key, v) }()
	s, ok := b.last(key)
	if !ok {
		return def
	}
	v, ok = parseBool(s.Value)
	if !ok {
		b.errAt(s, "%q is not a boolean (use 1 or 0)", s.Value)
		return def
	}
	return v
}

func parseBool(v string) (bool, bool) {
	switch strings.ToLower(v) {
	case "1", "yes", "true", "on":
		return true, true
	case "0", "no", "false", "off":
		return false, true
	}
	return false, false
}

// String binds free text.
func (b *Binder) String(key, def string) (v string) {
	defer func() { b.record(key, strconv.Quote(v)) }()
	s, ok := b.last(key)
	if !ok {
		return def
	}
	return s.Value
}

// Prefixes binds a list of networks. Every occurrence of the key adds to
// the list; items are separated by commas or blanks.
func (b *Binder) Prefixes(key string) *PrefixList {
	var pl PrefixList
	for _, s := range b.all(key) {
		for _, item := range splitList(s.Value) {
			if err := pl.Add(item); err != nil {
				b.errAt(s, "%v", err)
			}
		}
	}
	b.record(key, "["+pl.String()+"]")
	return &pl
}

// Strings binds a repeatable key: every occurrence, in order (the rule
// file's lines first, then the plugins line).
func (b *Binder) Strings(key string) []string {
	var out []string
	for _, s := range b.all(key) {
		out = append(out, s.Value)
	}
	b.record(key, fmt.Sprintf("%q", out))
	return out
}

// Lines returns the rule file's lines that are not "key value" pairs, for
// rules whose Definition asks for RawLines (seed formats such as
// spamthrottle's "ipblock:dir:st:..."). Each keeps its file:line.
func (b *Binder) Lines() []Setting {
	return b.all("")
}

// Each returns every setting of key with its file:line, marking them
// read, for a rule that reports problems per entry.
func (b *Binder) Each(key string) []Setting {
	return b.all(key)
}

// Unread takes every setting no key has read yet, for a rule whose file
// holds entries in a format of its own (qpsmtpd's "user@dom reason"
// lines); call it after the named keys. Each keeps its file:line.
func (b *Binder) Unread() []Setting {
	var out []Setting
	for i, s := range b.settings {
		if !b.used[i] {
			b.used[i] = true
			out = append(out, s)
		}
	}
	return out
}

// ErrorAt reports a problem with one setting, at its file:line.
func (b *Binder) ErrorAt(s Setting, format string, args ...any) {
	b.errAt(s, format, args...)
}

// Warnf reports something worth fixing that does not stop the rule, at
// the rule's plugins line.
func (b *Binder) Warnf(format string, args ...any) {
	*b.warns = append(*b.warns, ConfigError{Pos: b.linePos, Msg: b.rule + ": " + fmt.Sprintf(format, args...), Warning: true})
}

// Obsolete accepts key for compatibility and warns that it has no effect.
func (b *Binder) Obsolete(key, why string) {
	for _, s := range b.all(key) {
		*b.warns = append(*b.warns, ConfigError{Pos: s.Pos, Msg: b.rule + ": " + s.Key + " is ignored: " + why, Warning: true})
	}
}

// finish reports every setting no getter asked for.
func (b *Binder) finish() {
	for i, s := range b.settings {
		if !b.used[i] {
			*b.errs = append(*b.errs, ConfigError{Pos: s.Pos, Msg: fmt.Sprintf("%s: unknown key %q", b.rule, s.Key)})
		}
	}
}

func splitList(v string) []string {
	return strings.FieldsFunc(v, func(r rune) bool { return r == ',' || r == ' ' || r == '\t' })
}
