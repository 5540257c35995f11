package rules_test

import (
	"errors"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/policyd-mail/policyd/rules"
)

// linesProbe keeps what the Binder gave it, for the tests below.
type linesProbe struct {
	names []string
	lines []string
}

var lastLinesProbe *linesProbe

func init() {
	rules.Register(rules.Definition{Name: "lines_probe", RawLines: true, Setup: func(b *rules.Binder, _ rules.Env) (any, error) {
		p := &linesProbe{names: b.Strings("name")}
		for _, l := range b.Lines() {
			if strings.HasPrefix(l.Value, "bad") {
				b.ErrorAt(l, "line %q is bad", l.Value)
				continue
			}
			p.lines = append(p.lines, l.Value)
		}
		if len(p.names) == 0 {
			b.Warnf("no names given")
		}
		lastLinesProbe = p
		return p, nil
	}})
}

func TestBinderListsAndRawLines(t *testing.T) {
	fsys := fstest.MapFS{
		"plugins":     {Data: []byte("lines_probe name c\n")},
		"lines_probe": {Data: []byte("name a\n192.168.:/var/qmail/spamt:100:5000\nname b\n:dir:1:2\n")},
	}
	if _, warns, err := rules.Load(fsys, "cfg", rules.Options{}); err != nil || len(warns) != 0 {
		t.Fatalf("load: %v %v", err, warns)
	}
	if got := strings.Join(lastLinesProbe.names, ","); got != "a,b,c" {
		t.Errorf("Strings = %s, want a,b,c (file first, then the plugins line)", got)
	}
	if got := strings.Join(lastLinesProbe.lines, " "); got != "192.168.:/var/qmail/spamt:100:5000 :dir:1:2" {
		t.Errorf("Lines = %s", got)
	}

	fsys["lines_probe"] = &fstest.MapFile{Data: []byte("\nbadline\n")}
	fsys["plugins"] = &fstest.MapFile{Data: []byte("lines_probe\n")}
	_, warns, err := rules.Load(fsys, "cfg", rules.Options{})
	var ce rules.ConfigErrors
	if !errors.As(err, &ce) || ce.Error() != `cfg/lines_probe:2: lines_probe: line "badline" is bad` {
		t.Errorf("raw line error = %v", err)
	}
	if len(warns) != 1 || warns[0].Error() != "cfg/plugins:1: warning: lines_probe: no names given" {
		t.Errorf("warnings = %v", warns)
	}
}
