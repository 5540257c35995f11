package all

import (
	"bufio"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/policyd-mail/policyd/rules"
)

// Every rule's README has the fixed sections, and every example in it is
// a configuration that loads without error or warning.
func TestRuleREADMEs(t *testing.T) {
	for _, name := range rules.Registered() {
		t.Run(name, func(t *testing.T) {
			path := filepath.Join("..", name, "README.md")
			data, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("rule %s has no README: %v", name, err)
			}
			text := string(data)
			for _, sec := range []string{"# " + name, "## Description", "## Hooks", "## Configuration", "## Stored keys", "## Metrics", "## Examples"} {
				if !strings.Contains(text, "\n"+sec+"\n") && !strings.HasPrefix(text, sec+"\n") {
					t.Errorf("%s: missing section %q", path, sec)
				}
			}
			examples := readmeExamples(text)
			if len(examples) == 0 {
				t.Fatalf("%s: no examples", path)
			}
			for title, fsys := range examples {
				if _, ok := fsys["plugins"]; !ok {
					t.Errorf("%s: example %q has no plugins block", path, title)
					continue
				}
				_, warns, err := rules.Load(fsys, "example", rules.Options{})
				if err != nil {
					t.Errorf("%s: example %q does not load:\n%v", path, title, err)
				}
				for _, w := range warns {
					if !strings.Contains(w.Msg, "memcached") { // the seed example warns on purpose
						t.Errorf("%s: example %q warns: %v", path, title, w)
					}
				}
			}
		})
	}
}

// readmeExamples collects, per "### " subsection of Examples, the fenced
// blocks tagged "plugins" or "config <file>".
func readmeExamples(text string) map[string]fstest.MapFS {
	out := map[string]fstest.MapFS{}
	in := false
	title := ""
	var block *strings.Builder
	file := ""
	sc := bufio.NewScanner(strings.NewReader(text))
	for sc.Scan() {
		line := sc.Text()
		switch {
		case block != nil && line == "```":
			out[title][file] = &fstest.MapFile{Data: []byte(block.String())}
			block = nil
		case block != nil:
			block.WriteString(line + "\n")
		case strings.HasPrefix(line, "## "):
			in = line == "## Examples"
		case in && strings.HasPrefix(line, "### "):
			title = strings.TrimPrefix(line, "### ")
			out[title] = fstest.MapFS{}
		case in && title != "" && line == "```plugins":
			file, block = "plugins", &strings.Builder{}
		case in && title != "" && strings.HasPrefix(line, "```config "):
			file, block = strings.TrimPrefix(line, "```config "), &strings.Builder{}
		}
	}
	return out
}
