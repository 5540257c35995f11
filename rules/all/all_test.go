package all

import (
	"os"
	"slices"
	"testing"

	"github.com/policyd-mail/policyd/rules"
)

// Every folder under rules/ that holds a rule must be registered through
// this package, or the daemon would not know it.
func TestEveryRuleFolderIsImported(t *testing.T) {
	entries, err := os.ReadDir("..")
	if err != nil {
		t.Fatal(err)
	}
	registered := rules.Registered()
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		switch e.Name() {
		case "all", "rulestest", "testdata", "luaplugin":
			continue
		}
		if !slices.Contains(registered, e.Name()) {
			t.Errorf("rules/%s is not registered: add its blank import to rules/all", e.Name())
		}
	}
}
