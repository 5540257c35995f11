package rules_test

import (
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/policyd-mail/policyd/rules"
	_ "github.com/policyd-mail/policyd/rules/connection_shaper"
	"github.com/policyd-mail/policyd/rules/rulestest"
	_ "github.com/policyd-mail/policyd/rules/whitelist"
)

// Each directory under testdata/badconfig is a config directory plus the
// exact problems an operator must read, in file:line order.
func TestBadConfigCorpus(t *testing.T) {
	cases, err := filepath.Glob("testdata/badconfig/*")
	if err != nil || len(cases) == 0 {
		t.Fatalf("no corpus: %v", err)
	}
	for _, dir := range cases {
		t.Run(filepath.Base(dir), func(t *testing.T) {
			want, err := os.ReadFile(filepath.Join(dir, "expected"))
			if err != nil {
				t.Fatal(err)
			}
			_, _, err = rules.Load(os.DirFS(dir), dir, rules.Options{})
			var ce rules.ConfigErrors
			if !errors.As(err, &ce) {
				t.Fatalf("Load error = %v, want ConfigErrors", err)
			}
			got := strings.ReplaceAll(ce.Error(), dir+"/", "") + "\n"
			if got != string(want) {
				t.Errorf("got:\n%s\nwant:\n%s", got, want)
			}
		})
	}
}

func TestDefaultConfigLoads(t *testing.T) {
	c, warns, err := rules.Load(rules.DefaultConfig(), "(built-in)", rules.Options{})
	if err != nil || len(warns) > 0 {
		t.Fatalf("built-in config: %v %v", err, warns)
	}
	if got := strings.Join(c.Rules(), ","); got != "whitelist,connection_shaper" {
		t.Fatalf("built-in chain = %s", got)
	}
	desc := c.Describe()
	for _, want := range []string{"1. whitelist ((built-in)/plugins:4) hooks=connect clients=[127.0.0.0/8,::1/128]", "2. connection_shaper ((built-in)/plugins:5) hooks=connect exptime=1m0s threshold=30"} {
		if !strings.Contains(desc, want) {
			t.Errorf("Describe lacks %q:\n%s", want, desc)
		}
	}
}

func TestParsePrefix(t *testing.T) {
	tests := []struct {
		in, want string
		bad      bool
	}{
		{in: "10.0.0.0/8", want: "10.0.0.0/8"},
		{in: "10.1.2.3/8", want: "10.0.0.0/8"},
		{in: "2001:db8::/32", want: "2001:db8::/32"},
		{in: "192.0.2.1", want: "192.0.2.1/32"},
		{in: "2001:db8::1", want: "2001:db8::1/128"},
		{in: "192.168.1.", want: "192.168.1.0/24"},
		{in: "10.0.0", want: "10.0.0.0/24"},
		{in: "10.", want: "10.0.0.0/8"},
		{in: "172.16", want: "172.16.0.0/16"},
		{in: "::ffff:10.0.0.1", want: "10.0.0.1/32"},
		{in: "300.1.", bad: true},
		{in: "example.com", bad: true},
		{in: "10.0.0.0/40", bad: true},
		{in: ".", bad: true},
		{in: "", bad: true},
	}
	for _, tc := range tests {
		p, err := rules.ParsePrefix(tc.in)
		if tc.bad {
			if err == nil {
				t.Errorf("%q accepted as %v", tc.in, p)
			}
			continue
		}
		if err != nil || p.String() != tc.want {
			t.Errorf("%q = %v, %v; want %s", tc.in, p, err, tc.want)
		}
	}
}

func TestParseDuration(t *testing.T) {
	for in, ok := range map[string]bool{"60": true, "90s": true, "12h": true, "-1": false, "soon": false, "1.5": false} {
		if _, err := rules.ParseDuration(in); (err == nil) != ok {
			t.Errorf("ParseDuration(%q) err=%v", in, err)
		}
	}
}

func TestQuotedArguments(t *testing.T) {
	h := rulestest.New(t, `connection_shaper:0 text "Go away, \"spammer\"" threshold 1`+"\nconnection_shaper:1 threshold 1\n",
		map[string]string{"connection_shaper": "text \"Slow # down\"\n"})
	h.Connect("192.0.2.1")
	_, d := h.Connect("192.0.2.1")
	if got := d.Reply.String(); got != `450 4.7.1 Go away, "spammer"` {
		t.Errorf("plugins line text: %s", got)
	}
	h2 := rulestest.New(t, "connection_shaper threshold 1", map[string]string{"connection_shaper": "text \"Slow # down\"\n"})
	h2.Connect("192.0.2.1")
	_, d = h2.Connect("192.0.2.1")
	if got := d.Reply.String(); got != "450 4.7.1 Slow # down" {
		t.Errorf("rule file text: %s", got)
	}
}

func TestCleanText(t *testing.T) {
	if got := rules.CleanText("a\r\nb\x00c"); got != "a  b c" {
		t.Errorf("CleanText = %q", got)
	}
	if got := rules.CleanText(strings.Repeat("x", 1000)); len(got) != rules.MaxReplyText {
		t.Errorf("CleanText kept %d bytes", len(got))
	}
}
