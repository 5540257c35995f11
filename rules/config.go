package rules

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"strconv"
	"strings"

	"github.com/policyd-mail/policyd/examples"
)

// DefaultConfig returns the built-in configuration directory, used when no
// config directory exists: examples/default. It must stay safe for a
// stranger: a first message from an unknown client is never refused.
func DefaultConfig() fs.FS {
	sub, err := fs.Sub(examples.Default, "default")
	if err != nil {
		panic(err) // the embed pattern guarantees the directory
	}
	return sub
}

// PluginLine is one line of the plugins file.
type PluginLine struct {
	Name string // instance name, "rule" or "rule:N"
	Rule string // rule name without the instance suffix
	Args []string
	Pos  Pos
	// Script is the script's path for a scripted rule, else "".
	Script string
	def    Definition
}

// maxConfigLine bounds a config line so a garbage file cannot eat memory.
const maxConfigLine = 64 << 10

// readLines calls fn with every meaningful line of file (comments and
// blank lines dropped), numbered from 1.
func readLines(fsys fs.FS, file, display string, errs *ConfigErrors, fn func(line string, pos Pos)) bool {
	data, err := fs.ReadFile(fsys, file)
	if errors.Is(err, fs.ErrNotExist) {
		return false
	}
	if err != nil {
		*errs = append(*errs, ConfigError{Pos: Pos{File: display, Line: 0}, Msg: fmt.Sprintf("cannot read: %v", err)})
		return false
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	sc.Buffer(make([]byte, 4096), maxConfigLine)
	n := 0
	for sc.Scan() {
		n++
		line := stripComment(sc.Text())
		if line == "" {
			continue
		}
		fn(line, Pos{File: display, Line: n})
	}
	if err := sc.Err(); err != nil {
		*errs = append(*errs, ConfigError{Pos: Pos{File: display, Line: n + 1}, Msg: fmt.Sprintf("unreadable line: %v", err)})
	}
	return true
}

// stripComment drops a comment: a line starting with '#', or a '#' after
// a blank outside double quotes. A reply text holding " #" is quoted.
func stripComment(line string) string {
	line = strings.TrimSpace(line)
	quoted := false
	for i := 0; i < len(line); i++ {
		switch ch := line[i]; {
		case ch == '\\' && quoted:
			i++
		case ch == '"':
			quoted = !quoted
		case ch == '#' && !quoted && (i == 0 || line[i-1] == ' ' || line[i-1] == '\t'):
			return strings.TrimSpace(line[:i])
		}
	}
	return line
}

// parsePlugins reads the plugins file.
func parsePlugins(fsys fs.FS, dir string, pluginDirs []string, errs *ConfigErrors) []PluginLine {
	display := path.Join(dir, "plugins")
	var out []PluginLine
	seen := map[string]Pos{}
	found := readLines(fsys, "plugins", display, errs, func(line string, pos Pos) {
		f, err := splitArgs(line)
		if err != nil {
			*errs = append(*errs, ConfigError{Pos: pos, Msg: err.Error()})
			return
		}
		name := f[0]
		rule, inst, hasInst := strings.Cut(name, ":")
		if hasInst {
			if _, err := strconv.ParseUint(inst, 10, 16); err != nil {
				*errs = append(*errs, ConfigError{Pos: pos, Msg: fmt.Sprintf("%s: instance suffix %q is not a number", name, inst)})
				return
			}
		}
		def, script, err := resolve(fsys, dir, pluginDirs, rule)
		if err != nil {
			*errs = append(*errs, ConfigError{Pos: pos, Msg: err.Error()})
			return
		}
		if def.Setup == nil {
			msg := fmt.Sprintf("unknown rule %q", rule)
			if near := nearest(rule, Registered()); near != "" {
				msg += fmt.Sprintf(" (did you mean %q?)", near)
			}
			*errs = append(*errs, ConfigError{Pos: pos, Msg: msg})
			return
		}
		if first, dup := seen[name]; dup {
			*errs = append(*errs, ConfigError{Pos: pos, Msg: fmt.Sprintf("%s is already loaded at line %d; use %s:0, %s:1 for two instances", name, first.Line, rule, rule)})
			return
		}
		seen[name] = pos
		out = append(out, PluginLine{Name: name, Rule: rule, Args: f[1:], Pos: pos, Script: script, def: def})
	})
	if !found {
		*errs = append(*errs, ConfigError{Pos: Pos{File: display}, Msg: "missing: the plugins file lists the rules to run, one per line"})
	}
	return out
}

// settingsFor gathers a rule's settings: its own file first, then the
// plugins line, so the more specific plugins line wins.
func settingsFor(fsys fs.FS, dir string, pl PluginLine, def Definition, errs *ConfigErrors) []Setting {
	var out []Setting
	display := path.Join(dir, pl.Rule)
	readLines(fsys, pl.Rule, display, errs, func(line string, pos Pos) {
		key, value, _ := strings.Cut(line, " ")
		if i := strings.IndexByte(key, '\t'); i >= 0 {
			key, value = line[:i], line[i+1:]
		}
		value = unquote(strings.TrimSpace(value))
		if value == "" && def.RawLines {
			out = append(out, Setting{Key: "", Value: line, Pos: pos})
			return
		}
		if value == "" {
			*errs = append(*errs, ConfigError{Pos: pos, Msg: fmt.Sprintf("%s: %s: missing value (lines are \"key value\")", pl.Rule, key)})
			return
		}
		out = append(out, Setting{Key: key, Value: value, Pos: pos})
	})
	parse := PairSettings
	if def.Positional != nil {
		parse = def.Positional
	}
	args, err := parse(pl.Args)
	if err != nil {
		*errs = append(*errs, ConfigError{Pos: pl.Pos, Msg: pl.Name + ": " + err.Error()})
		return out
	}
	for _, a := range args {
		a.Pos = pl.Pos
		out = append(out, a)
	}
	return out
}

// PairSettings reads plugins-line arguments in the usual "key value ..."
// form. Positional parsers fall back to it.
func PairSettings(args []string) ([]Setting, error) {
	if len(args)%2 != 0 {
		return nil, fmt.Errorf("arguments are \"key value\" pairs; %q has no value", args[len(args)-1])
	}
	out := make([]Setting, 0, len(args)/2)
	for i := 0; i < len(args); i += 2 {
		out = append(out, Setting{Key: args[i], Value: args[i+1]})
	}
	return out, nil
}

// splitArgs splits a plugins line on blanks; a double-quoted argument may
// hold blanks (a reply text), with \" and \\ as escapes.
func splitArgs(line string) ([]string, error) {
	var out []string
	var cur strings.Builder
	inWord, quoted := false, false
	for i := 0; i < len(line); i++ {
		ch := line[i]
		switch {
		case quoted && ch == '\\' && i+1 < len(line):
			i++
			cur.WriteByte(line[i])
		case quoted && ch == '"':
			quoted = false
		case quoted:
			cur.WriteByte(ch)
		case ch == '"':
			quoted, inWord = true, true
		case ch == ' ' || ch == '\t':
			if inWord {
				out = append(out, cur.String())
				cur.Reset()
				inWord = false
			}
		default:
			cur.WriteByte(ch)
			inWord = true
		}
	}
	if quoted {
		return nil, fmt.Errorf("unterminated quote")
	}
	if inWord {
		out = append(out, cur.String())
	}
	return out, nil
}

// unquote drops the quotes around a rule file value written as on the
// plugins line, so both places read the same.
func unquote(v string) string {
	if len(v) >= 2 && v[0] == '"' && v[len(v)-1] == '"' {
		if w, err := splitArgs(v); err == nil && len(w) == 1 {
			return w[0]
		}
	}
	return v
}

// nearest returns the name within two edits of s, if any: the usual typo.
func nearest(s string, names []string) string {
	best, bestD := "", 3
	for _, n := range names {
		if d := editDistance(s, n); d < bestD {
			best, bestD = n, d
		}
	}
	return best
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
