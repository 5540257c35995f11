package rules

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path"
	"sync"
)

// Scripted plugins (SPEC §9): a rule written by the admin, found as
// plugins.d/NAME.lua when NAME on a plugins line is no built-in rule. The
// engine that runs them (rules/luaplugin) registers itself here, so the
// chain knows scripts without depending on a script VM.

// ScriptSource is one script file found for a plugins line.
type ScriptSource struct {
	Name    string // the rule name: the file's base name without .lua
	Display string // the path errors name, relative to the config directory ("plugins.d/NAME.lua")
	Code    []byte
	// Config is the config directory, for the script's config.list.
	Config fs.FS
}

// ScriptEngine turns a script into a rule definition.
type ScriptEngine interface {
	Definition(src ScriptSource) Definition
}

var (
	scriptMu     sync.RWMutex
	scriptEngine ScriptEngine
)

// RegisterScriptEngine makes scripts loadable; the engine's package
// calls it from init.
func RegisterScriptEngine(e ScriptEngine) {
	scriptMu.Lock()
	scriptEngine = e
	scriptMu.Unlock()
}

// ScriptDir is where a config directory keeps its scripts.
const ScriptDir = "plugins.d"

// findScript looks for NAME.lua in the plugin directories, then in the
// config directory's plugins.d. ok is false when there is none.
func findScript(fsys fs.FS, dir string, dirs []string, name string) (ScriptSource, bool, error) {
	file := name + ".lua"
	for _, d := range dirs {
		code, err := fs.ReadFile(os.DirFS(d), file)
		if err == nil {
			return ScriptSource{Name: name, Display: path.Join(d, file), Code: code, Config: fsys}, true, nil
		}
		if !errors.Is(err, fs.ErrNotExist) {
			return ScriptSource{}, false, fmt.Errorf("--plugin-dir: %s: %w", file, err)
		}
	}
	p := path.Join(ScriptDir, file)
	code, err := fs.ReadFile(fsys, p)
	switch {
	case err == nil:
		return ScriptSource{Name: name, Display: path.Join(dir, p), Code: code, Config: fsys}, true, nil
	case errors.Is(err, fs.ErrNotExist):
		return ScriptSource{}, false, nil
	}
	return ScriptSource{}, false, fmt.Errorf("%s: %w", p, err)
}

// resolve finds the definition of a plugins line's rule: a built-in rule
// or a script, never both.
func resolve(fsys fs.FS, dir string, dirs []string, rule string) (Definition, string, error) {
	def, builtin := lookup(rule)
	scriptMu.RLock()
	eng := scriptEngine
	scriptMu.RUnlock()
	if eng == nil {
		if !builtin {
			return Definition{}, "", nil
		}
		return def, "", nil
	}
	src, found, err := findScript(fsys, dir, dirs, rule)
	switch {
	case err != nil:
		return Definition{}, "", err
	case found && builtin:
		return Definition{}, "", fmt.Errorf("%s is a built-in rule and %s a script of that name: rename the script (a script never silently replaces a rule, nor the other way round)", rule, src.Display)
	case found:
		return eng.Definition(src), src.Display, nil
	}
	return def, "", nil
}

// Scripted is a rule whose hooks are known only once it is built (a
// script defines some of hook_connect … hook_ok): it lists them, and one
// method answers each. Observers (HookDeny, HookOK) go to Observe.
type Scripted interface {
	Hooks() []Hook
	Call(ctx context.Context, h Hook, s *Session) (Result, error)
	Observe(ctx context.Context, h Hook, s *Session, d Decision) error
}

// KindError is an error that says what kind of rule error it is for
// policyd_rule_errors_total (a script's "script"); others are "store".
type KindError interface {
	error
	RuleErrorKind() string
}

func errorKind(err error) string {
	var k KindError
	if errors.As(err, &k) {
		return k.RuleErrorKind()
	}
	return "store"
}
