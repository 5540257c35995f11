package rules

import (
	"fmt"
	"sort"
	"sync"
)

// Setup builds one rule instance from its settings. It returns a value
// implementing one or more hook interfaces; errors about settings go through
// the Binder (so they carry file:line), the returned error is for anything
// else.
type Setup func(b *Binder, env Env) (any, error)

// Definition describes a rule type.
type Definition struct {
	Name  string
	Setup Setup
	// Positional, when set, turns a plugins line's arguments into settings
	// for rules whose seed took positional arguments. Without it the
	// arguments are "key value" pairs.
	Positional func(args []string) ([]Setting, error)
	// RawLines, when set, passes the rule file's lines that have no value
	// (no blank after the first word) to the rule as settings with an
	// empty Key, read with Binder.Lines, instead of rejecting them.
	RawLines bool
	// NeverRefuses marks a rule that only records or marks (client_stats,
	// whitelist): when it cannot reach the store, --on-store-error
	// tempfail must not turn that into a refusal nobody decided.
	NeverRefuses bool
	// Needs names rules that must come before this one in plugins: it
	// reads what they leave (denysoft_client_stats, client_stats' note).
	Needs []string
	// Early marks a rule that only works for the rules after it (the
	// whitelist marks sessions that later rules skip).
	Early bool
}

var (
	regMu    sync.RWMutex
	registry = map[string]Definition{}
)

// Register makes a rule available under its name. Rules call it from
// init(); a duplicate name is a programming error.
func Register(d Definition) {
	regMu.Lock()
	defer regMu.Unlock()
	if d.Name == "" || d.Setup == nil {
		panic("rules: Register needs a name and a Setup")
	}
	if _, dup := registry[d.Name]; dup {
		panic(fmt.Sprintf("rules: rule %q registered twice", d.Name))
	}
	registry[d.Name] = d
}

func lookup(name string) (Definition, bool) {
	regMu.RLock()
	defer regMu.RUnlock()
	d, ok := registry[name]
	return d, ok
}

// Registered lists the names of every registered rule, sorted.
func Registered() []string {
	regMu.RLock()
	defer regMu.RUnlock()
	names := make([]string, 0, len(registry))
	for n := range registry {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}
