package rules_test

import (
	"testing"
	"testing/fstest"

	"github.com/policyd-mail/policyd/rules"
)

// The config loader never panics, whatever the files hold, and every
// problem it reports carries a place.
func FuzzLoad(f *testing.F) {
	f.Add("connection_shaper threshold 3\n", "exptime 60\nwhitelist 10.0.0.0/8, 192.168.1.\n")
	f.Add("whitelist clients \"10.0.0.0/8\"\nconnection_shaper:1 text \"a # b\"\n", "threshold x\n")
	f.Add("probe:0 answer DENY\n# c\n\n", "\x00\xff\n")
	f.Fuzz(func(t *testing.T, plugins, file string) {
		fsys := fstest.MapFS{
			"plugins":           {Data: []byte(plugins)},
			"connection_shaper": {Data: []byte(file)},
			"whitelist":         {Data: []byte(file)},
		}
		_, warns, err := rules.Load(fsys, "cfg", rules.Options{})
		if ce, ok := err.(rules.ConfigErrors); ok {
			for _, e := range ce {
				if e.Pos.File == "" {
					t.Fatalf("error without a place: %v", e)
				}
			}
		}
		for _, w := range warns {
			if w.Pos.File == "" {
				t.Fatalf("warning without a place: %v", w)
			}
		}
	})
}

// Prefix parsing never panics, and what it accepts contains the network
// address it names.
func FuzzParsePrefix(f *testing.F) {
	for _, s := range []string{"10.0.0.0/8", "192.168.1.", "10.0.0", "2001:db8::/32", "::ffff:10.0.0.1", "1.2.3.4", "300.1.", "/", "1.2.3.4/99"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		p, err := rules.ParsePrefix(in)
		if err != nil {
			return
		}
		if !p.IsValid() || !p.Contains(p.Addr()) {
			t.Fatalf("%q parsed to %v", in, p)
		}
		var l rules.PrefixList
		if err := l.Add(in); err != nil || !l.Contains(p.Addr()) {
			t.Fatalf("%q: list does not contain its own network %v (%v)", in, p, err)
		}
	})
}
