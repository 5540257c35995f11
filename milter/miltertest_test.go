package milter_test

import (
	"context"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/milter"
	"github.com/policyd-mail/policyd/rules/rulestest"
)

// Protocol edge cases driven by Debian's miltertest (from OpenDKIM), a
// libmilter-based MTA simulator, not by our own client.
func TestMiltertestScripts(t *testing.T) {
	bin, err := exec.LookPath("miltertest")
	if err != nil {
		t.Fatal("miltertest is not installed; `make test` installs it (Debian package miltertest)")
	}
	tests := []struct {
		script  string
		plugins string
		events  []string // recorded hook lines that must appear, in order
		logs    []string
	}{
		{script: "concurrent.lua", plugins: "connection_shaper threshold 2"},
		{script: "abort.lua", plugins: "mprobe",
			events: []string{"mail client=192.0.2.20 helo=client.example qid=QABORT from=first@example.org", "reset_transaction client=192.0.2.20 helo=client.example qid=QABORT", "mail client=192.0.2.20 helo=client.example qid=QSECOND from=second@example.org", "rcpt client=192.0.2.20 helo=client.example qid=QSECOND from=second@example.org rcpt=r2@example.test", "data_post", "disconnect"}},
		{script: "two-messages.lua", plugins: "mprobe\nconnection_shaper threshold 1",
			events: []string{"data_post client=192.0.2.30 helo=client.example qid=QMSG1", "data_post client=192.0.2.30 helo=client.example qid=QMSG2"}},
		{script: "late-macros.lua", plugins: "mprobe at rcpt answer DENY say no",
			logs:   []string{"queue_id=QLATE42", "hook=rcpt", "answer=DENY"},
			events: []string{"rcpt client=192.0.2.40 helo=client.example qid=QLATE42 from=carol@example.org rcpt=r@example.test auth=carol"}},
	}
	for _, tc := range tests {
		t.Run(tc.script, func(t *testing.T) {
			takeEvents()
			h := rulestest.New(t, tc.plugins, nil)
			_, addr := serve(t, h, milter.Config{})
			host, port, _ := strings.Cut(addr, ":")
			ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
			defer cancel()
			cmd := exec.CommandContext(ctx, bin, "-D", "sock=inet:"+port+"@"+host, "-s", filepath.Join("testdata", "miltertest", tc.script))
			out, err := cmd.CombinedOutput()
			if err != nil {
				t.Fatalf("miltertest %s: %v\n%s", tc.script, err, out)
			}
			if len(tc.events) > 0 {
				waitEvent(t, tc.events[len(tc.events)-1])
			}
			got := strings.Join(takeEvents(), "\n")
			pos := 0
			for _, e := range tc.events {
				i := strings.Index(got[pos:], e)
				if i < 0 {
					t.Fatalf("event %q missing (in order) from:\n%s", e, got)
				}
				pos += i + len(e)
			}
			for _, l := range tc.logs {
				if !strings.Contains(h.Logs.String(), l) {
					t.Errorf("decision log lacks %q:\n%s", l, h.Logs.String())
				}
			}
		})
	}
}
