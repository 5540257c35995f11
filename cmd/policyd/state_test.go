package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/testing/testredis"
	"github.com/policyd-mail/policyd/store"
	"github.com/policyd-mail/policyd/store/memory"
)

// A damaged snapshot, through the real binary: --state-max-loss refuses
// to start and says why; without it the daemon starts with every record
// but the damaged one, keeps the damaged file, and says so in its log,
// on /readyz (still 200: mail must flow) and on /metrics.
func TestDamagedStateDirectory(t *testing.T) {
	state := t.TempDir()
	d := startDaemon(t, "--state-dir", state)
	c, err := net.Dial("tcp", d.policy)
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	for i := range 200 {
		policyAsk(t, c, br, "protocol_state=RCPT", fmt.Sprintf("client_address=192.0.2.%d", i), "client_port=1",
			"sender=s@example.org", "recipient=r@example.test")
	}
	c.Close()
	if rc := d.stop(t); rc != 0 {
		t.Fatalf("exit code %d", rc)
	}
	snap := filepath.Join(state, "snapshot")
	b, err := os.ReadFile(snap)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)/2] ^= 0xff
	os.WriteFile(snap, b, 0o600)

	refuse := exec.Command(binPath, "serve", "--state-dir", state, "--state-max-loss", "0",
		"--policy-listen", "127.0.0.1:0", "--milter-listen", "", "--http-listen", "")
	refuse.Dir = t.TempDir()
	out, err := refuse.CombinedOutput()
	if ee, ok := err.(*exec.ExitError); !ok || ee.ExitCode() != 1 || !strings.Contains(string(out), "--state-max-loss 0") {
		t.Fatalf("--state-max-loss 0 on a damaged snapshot: %v\n%s", err, out)
	}

	d = startDaemon(t, "--state-dir", state)
	d.log.waitFor(t, "1 record lost", 1)
	kept, _ := filepath.Glob(filepath.Join(state, "snapshot.damaged.*"))
	if len(kept) == 0 {
		t.Fatalf("no snapshot.damaged.* kept in the state directory")
	}
	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get("http://" + d.http + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	waitStatus(t, "http://"+d.http+"/readyz", http.StatusOK, 10*time.Second)
	code, body := get("/readyz")
	if code != http.StatusOK || !strings.Contains(body, "degraded: state loaded with damage at start-up (1 record lost") {
		t.Errorf("/readyz: %d %q", code, body)
	}
	if _, m := get("/metrics"); !strings.Contains(m, "\npolicyd_state_load_records_lost 1\n") || !strings.Contains(m, "\npolicyd_state_behind 0\n") {
		t.Errorf("/metrics lacks the state series:\n%s", grepLines(m, "policyd_state_"))
	}
}

func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// An upgrade keeps client_stats' history: records an earlier policyd
// left under the earlier key shape (a bare network after the rule), in a
// state directory or in Redis, are found by inspect and by the rule.
func TestUpgradeKeepsEarlierKeys(t *testing.T) {
	const old = "policyd:{192.0.0.0/8}:client_stats:192.0.2.0/24"
	for _, tc := range []struct {
		name  string
		store func(t *testing.T) []string
	}{
		{"memory", func(t *testing.T) []string {
			dir := t.TempDir()
			st, err := memory.Open(memory.Options{Dir: dir})
			if err != nil {
				t.Fatal(err)
			}
			st.HIncr(t.Context(), 0, store.FieldIncr{Key: old, Field: "permfail", Delta: 4})
			st.Close()
			return []string{"--state-dir", dir}
		}},
		{"redis", func(t *testing.T) []string {
			srv := testredis.Start(t)
			srv.MustDo("HINCRBY", old, "permfail", "4")
			return []string{"--store", srv.URL()}
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := startDaemon(t, tc.store(t)...)
			// Redis is migrated in the background after start-up.
			deadline := time.Now().Add(10 * time.Second)
			for {
				out, errs, rc := admin(t, d, "inspect", "192.0.2.9")
				if rc != 0 {
					t.Fatalf("inspect: rc=%d %s", rc, errs)
				}
				if strings.Contains(grepLines(out, "client_stats"), "192.0.2.0/24  hash") && strings.Contains(out, "permfail=4") {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("the earlier record is not found under its new key:\n%s\n%s", out, d.log.String())
				}
				time.Sleep(20 * time.Millisecond)
			}
		})
	}
}
