package main

import (
	"bufio"
	"bytes"
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/testing/testredis"
	"github.com/policyd-mail/policyd/internal/testing/testsync"
)

// askPolicy sends one RCPT request as a new SMTP session of client.
func askPolicy(t testing.TB, addr, client, port, sender string) string {
	t.Helper()
	return askRcpt(t, addr, "client_address="+client, "client_port="+port,
		"helo_name=h.example", "sender="+sender, "recipient=r@example.test", "instance=a.b.c.0")
}

// askRcpt sends one RCPT request with attrs on a connection of its own.
func askRcpt(t testing.TB, addr string, attrs ...string) string {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	return policyAsk(t, c, bufio.NewReader(c), append([]string{"protocol_state=RCPT"}, attrs...)...)
}

// admin runs policyd inspect or forget against d, as an operator would.
func admin(t testing.TB, d *proc, args ...string) (string, string, int) {
	t.Helper()
	var out, errw bytes.Buffer
	rc := run(append([]string{args[0], "--http", d.http}, args[1:]...), &out, &errw)
	return out.String(), errw.String(), rc
}

// A repeat offender is refused; inspect shows why, forget lets it in, on
// the embedded store and on Redis alike.
func TestInspectAndForget(t *testing.T) {
	cfg := t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("client_stats\ndeny_repeat_offenders threshold 3\nbadmailfrom\n"), 0o644)
	os.WriteFile(filepath.Join(cfg, "badmailfrom"), []byte("sender spam@example.org\n"), 0o644)
	for _, tc := range []struct {
		name  string
		store func(t *testing.T) []string
	}{
		{"memory", func(t *testing.T) []string { return []string{"--state-dir", t.TempDir()} }},
		{"redis", func(t *testing.T) []string { return []string{"--store", testredis.Start(t).URL()} }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := startDaemon(t, append([]string{"--config", cfg}, tc.store(t)...)...)
			const client = "192.0.2.66"
			if out, _, rc := admin(t, d, "inspect", client); rc != 0 || out != client+"/32: nothing stored\n" {
				t.Fatalf("inspect of a new client: rc=%d %q", rc, out)
			}
			for i := 1; i <= 3; i++ {
				if got := askPolicy(t, d.policy, client, fmt.Sprint(i), "spam@example.org"); !strings.HasPrefix(got, "action=550 5.7.1") {
					t.Fatalf("session %d: %s", i, got)
				}
			}
			if got := askPolicy(t, d.policy, client, "4", "ok@example.org"); !strings.HasPrefix(got, "action=450 4.7.1") {
				t.Fatalf("4th session: %s", got)
			}

			out, errs, rc := admin(t, d, "inspect", client)
			if rc != 0 {
				t.Fatalf("inspect: rc=%d %s", rc, errs)
			}
			for _, want := range []string{
				client + "/32: 5 records",
				"RULE", "EXPIRES IN",
				"deny_repeat_offenders  " + client + "/32", "count=3 last=20",
				"client_stats           " + client + "/32", "permfail=3",
				"client_stats           192.0.2.0/24",
				"client_stats           192.0.0.0/8",
			} {
				if !strings.Contains(out, want) {
					t.Errorf("inspect lacks %q:\n%s", want, out)
				}
			}

			out, _, rc = admin(t, d, "inspect", "--json", "192.0.2.0/24")
			var reply adminReply
			if err := json.Unmarshal([]byte(out), &reply); rc != 0 || err != nil {
				t.Fatalf("inspect --json: rc=%d %v\n%s", rc, err, out)
			}
			if reply.Client != "192.0.2.0/24" || len(reply.Records) != 5 {
				t.Errorf("inspect --json 192.0.2.0/24 = %+v", reply)
			}
			for _, r := range reply.Records {
				if r.Rule == "deny_repeat_offenders" && (r.About != client+"/32" || r.Kind != "hash" || r.Fields["count"] != 3 || r.TTL <= 0) {
					t.Errorf("offender record %+v", r)
				}
			}

			out, errs, rc = admin(t, d, "forget", client)
			if rc != 0 || !strings.Contains(out, client+"/32: deleted 2 records") ||
				!strings.Contains(out, "kept 3 records about wider networks") {
				t.Fatalf("forget: rc=%d %s\n%s", rc, errs, out)
			}
			if got := askPolicy(t, d.policy, client, "5", "ok@example.org"); got != "action=DUNNO" {
				t.Fatalf("session after forget: %s", got)
			}
			out, _, _ = admin(t, d, "inspect", client)
			if strings.Contains(out, "deny_repeat_offenders") || !strings.Contains(out, "192.0.2.0/24") {
				t.Errorf("inspect after forget:\n%s", out)
			}
			if !strings.Contains(d.log.String(), `msg="admin forget" client=192.0.2.66/32 deleted=2 kept=3`) {
				t.Errorf("forget not logged:\n%s", d.log.String())
			}
		})
	}
}

func TestAdminCommandErrors(t *testing.T) {
	d := startDaemon(t, "--state-dir", t.TempDir())
	for _, tc := range []struct {
		args []string
		rc   int
		err  string
	}{
		{[]string{"inspect", "mx.example.org"}, 2, `"mx.example.org" is neither an IP address nor a CIDR network`},
		{[]string{"forget", "192.0.2.0/33"}, 2, "neither an IP address nor a CIDR network"},
		{[]string{"inspect", "192.0.2.1", "192.0.2.2"}, 2, "one IP or CIDR at a time"},
	} {
		if _, errs, rc := admin(t, d, tc.args...); rc != tc.rc || !strings.Contains(errs, tc.err) {
			t.Errorf("%q: rc=%d %q, want rc=%d and %q", tc.args, rc, errs, tc.rc, tc.err)
		}
	}
	var out, errw bytes.Buffer
	if rc := run([]string{"inspect", "--http", "127.0.0.1:1", "192.0.2.1"}, &out, &errw); rc != 1 || !strings.Contains(errw.String(), "is the daemon running") {
		t.Errorf("no daemon: rc=%d %q", rc, errw.String())
	}
	if rc := run([]string{"inspect"}, &out, &errw); rc != 2 || !strings.Contains(errw.String(), "usage: policyd inspect") {
		t.Errorf("no client: rc=%d %q", rc, errw.String())
	}
}

// With --admin-token-file every admin request needs the token; the
// metrics and health endpoints do not.
func TestAdminToken(t *testing.T) {
	dir := t.TempDir()
	tokFile, wrong := filepath.Join(dir, "token"), filepath.Join(dir, "wrong")
	os.WriteFile(tokFile, []byte("s3cret\n"), 0o600)
	os.WriteFile(wrong, []byte("guess"), 0o600)
	d := startDaemon(t, "--state-dir", t.TempDir(), "--admin-token-file", tokFile)
	if _, errs, rc := admin(t, d, "inspect", "192.0.2.1"); rc != 1 || !strings.Contains(errs, "Unauthorized: the admin API needs the bearer token") {
		t.Errorf("without token: rc=%d %q", rc, errs)
	}
	if _, errs, rc := admin(t, d, "forget", "--admin-token-file", wrong, "192.0.2.1"); rc != 1 || !strings.Contains(errs, "Unauthorized") {
		t.Errorf("wrong token: rc=%d %q", rc, errs)
	}
	if out, errs, rc := admin(t, d, "inspect", "--admin-token-file", tokFile, "192.0.2.1"); rc != 0 || !strings.Contains(out, "nothing stored") {
		t.Errorf("with token: rc=%d %q %q", rc, out, errs)
	}
	resp, err := http.Get("http://" + d.http + "/healthz")
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("healthz with a token set: %v %v", resp, err)
	}
	resp.Body.Close()
	// Profiles are guarded like the admin API.
	resp, err = http.Get("http://" + d.http + "/debug/pprof/")
	if err != nil || resp.StatusCode != http.StatusUnauthorized {
		t.Fatalf("pprof without the token: %v %v", resp, err)
	}
	resp.Body.Close()
	req, _ := http.NewRequest("GET", "http://"+d.http+"/debug/pprof/goroutine?debug=1", nil)
	req.Header.Set("Authorization", "Bearer s3cret")
	resp, err = http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("pprof with the token: %v %v", resp, err)
	}
	resp.Body.Close()

	empty := filepath.Join(dir, "empty")
	os.WriteFile(empty, nil, 0o600)
	var out, errw bytes.Buffer
	if rc := run([]string{"serve", "--admin-token-file", empty, "--policy-listen", "", "--milter-listen", "", "--http-listen", ""}, &out, &errw); rc != 1 ||
		!strings.Contains(errw.String(), "is empty") {
		t.Errorf("empty token file: rc=%d %q", rc, errw.String())
	}
}

func TestAdminAuth(t *testing.T) {
	ok := http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { io.WriteString(w, "ok") })
	for _, tc := range []struct {
		name, token, remote, header string
		want                        int
		host                        string
	}{
		{"loopback without token", "", "127.0.0.1:4000", "", http.StatusOK, ""},
		{"IPv6 loopback", "", "[::1]:4000", "", http.StatusOK, "[::1]:10042"},
		{"localhost", "", "127.0.0.1:4000", "", http.StatusOK, "localhost:10042"},
		{"unix socket", "", "@", "", http.StatusOK, "policyd"},
		{"unix socket's placeholder host over TCP", "", "127.0.0.1:4000", "", http.StatusForbidden, "policyd"},
		{"remote without token", "", "192.0.2.9:4000", "", http.StatusForbidden, ""},
		{"rebound name without token", "", "127.0.0.1:4000", "", http.StatusForbidden, "evil.example:10042"},
		{"rebound name with token", "t0k", "127.0.0.1:4000", "Bearer t0k", http.StatusOK, "evil.example:10042"},
		{"remote with token", "t0k", "192.0.2.9:4000", "Bearer t0k", http.StatusOK, ""},
		{"wrong token", "t0k", "127.0.0.1:4000", "Bearer t0K", http.StatusUnauthorized, ""},
		{"no header", "t0k", "127.0.0.1:4000", "", http.StatusUnauthorized, ""},
		{"basic auth", "t0k", "127.0.0.1:4000", "Basic dDBr", http.StatusUnauthorized, ""},
	} {
		req := httptest.NewRequest("GET", "/api/v1/clients/192.0.2.1", nil)
		req.Host = cmp.Or(tc.host, "127.0.0.1:10042")
		req.RemoteAddr = tc.remote
		if tc.header != "" {
			req.Header.Set("Authorization", tc.header)
		}
		rec := httptest.NewRecorder()
		adminAuth(tc.token, ok).ServeHTTP(rec, req)
		if rec.Code != tc.want {
			t.Errorf("%s: %d %s, want %d", tc.name, rec.Code, rec.Body, tc.want)
		}
	}
}

// waitStatus polls url until it answers want; the deadline is generous,
// the poll ends as soon as the state is reached.
func waitStatus(t *testing.T, url string, want int, within time.Duration) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		resp, err := http.Get(url)
		code := 0
		if err == nil {
			code = resp.StatusCode
			resp.Body.Close()
		}
		if code == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: status %d (%v), want %d within %v", url, code, err, want, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// Redis killed during traffic: every request is still answered, within
// a bound far below Postfix's policy timeout, and mail flows (fail open);
// /readyz says 503 meanwhile. Redis back: /readyz is 200 again and
// counting resumes.
func TestDaemonRidesOutRedisOutage(t *testing.T) {
	srv := testredis.Start(t)
	cfg := t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("connection_shaper threshold 1 exptime 60\n"), 0o644)
	d := startDaemon(t, "--config", cfg, "--store", srv.URL())
	url := "http://" + d.http + "/readyz"
	waitStatus(t, url, http.StatusOK, 5*time.Second)

	c, err := net.Dial("tcp", d.policy)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	port := 0
	ask := func(client string) (string, time.Duration) {
		port++
		start := time.Now()
		got := policyAsk(t, c, br, "protocol_state=RCPT", "client_address="+client, fmt.Sprintf("client_port=%d", port),
			"sender=s@example.org", "recipient=r@example.test")
		return got, time.Since(start)
	}
	if got, _ := ask("192.0.2.90"); got != "action=DUNNO" {
		t.Fatalf("first session: %s", got)
	}
	if got, _ := ask("192.0.2.90"); !strings.HasPrefix(got, "action=450 4.7.1") {
		t.Fatalf("second session with Redis up: %s", got)
	}

	srv.Kill()
	var slowest time.Duration
	for i := range 50 {
		got, took := ask(fmt.Sprintf("192.0.2.%d", 100+i%20))
		if got != "action=DUNNO" {
			t.Fatalf("request %d with Redis down: %s (want fail open)", i, got)
		}
		slowest = max(slowest, took)
	}
	// --store-timeout is 100ms; the breaker answers at once after a few
	// failures. One second is far below any MTA's policy timeout.
	if slowest > time.Second {
		t.Errorf("slowest answer with Redis down took %v", slowest)
	}
	t.Logf("slowest of 50 answers with Redis down: %v", slowest)
	waitStatus(t, url, http.StatusServiceUnavailable, 5*time.Second)
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if !strings.HasPrefix(string(body), "not ready: store: ") {
		t.Errorf("readyz body %q", body)
	}

	srv.Restart()
	back := time.Now()
	waitStatus(t, url, http.StatusOK, 5*time.Second)
	t.Logf("ready %v after Redis was restarted", time.Since(back))
	if got, _ := ask("192.0.2.91"); got != "action=DUNNO" {
		t.Fatalf("first session after the outage: %s", got)
	}
	if got, _ := ask("192.0.2.91"); !strings.HasPrefix(got, "action=450 4.7.1") {
		t.Fatalf("second session after the outage: %s (counting has not resumed)", got)
	}
	if !strings.Contains(d.log.String(), "level=WARN") {
		t.Errorf("the outage was not logged:\n%s", d.log.String())
	}
}

// Two policyd hosts on one Redis share their counters: four sessions of
// one client spread over both, threshold 3, and the fourth is refused.
func TestTwoDaemonsShareRedis(t *testing.T) {
	srv := testredis.Start(t)
	cfg := t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("connection_shaper threshold 3 exptime 60\n"), 0o644)
	a := startDaemon(t, "--config", cfg, "--store", srv.URL())
	b := startDaemon(t, "--config", cfg, "--store", srv.URL())
	for i, d := range []*proc{a, b, a} {
		if got := askPolicy(t, d.policy, "192.0.2.77", fmt.Sprint(i+1), "s@example.org"); got != "action=DUNNO" {
			t.Fatalf("session %d: %s", i+1, got)
		}
	}
	if got := askPolicy(t, b.policy, "192.0.2.77", "4", "s@example.org"); !strings.HasPrefix(got, "action=450 4.7.1") {
		t.Fatalf("4th session, on the second host: %s", got)
	}
	if got := askPolicy(t, a.policy, "192.0.2.78", "1", "s@example.org"); got != "action=DUNNO" {
		t.Fatalf("another client: %s", got)
	}
	// Either host's admin API sees the shared counter.
	if out, _, rc := admin(t, a, "inspect", "192.0.2.77"); rc != 0 || !strings.Contains(out, "connection_shaper") || !strings.Contains(out, "  4\n") {
		t.Errorf("inspect on the first host: %s", out)
	}
}

// The admin API's guards, over real sockets: a forget of a network wider
// than /8 (IPv6 /16) needs --force, the unix socket's placeholder Host is
// refused over TCP, and a token file others can read is warned about.
func TestAdminGuards(t *testing.T) {
	dir := t.TempDir()
	tok := filepath.Join(dir, "token")
	os.WriteFile(tok, []byte("s3cret\n"), 0o644)
	d := startDaemon(t, "--state-dir", t.TempDir(), "--admin-token-file", tok)
	if !strings.Contains(d.log.String(), "admin-token-file is readable by other users") {
		t.Errorf("no warning about a world-readable token file:\n%s", d.log.String())
	}
	os.Chmod(tok, 0o600)
	askPolicy(t, d.policy, "192.0.2.66", "1", "a@example.org") // something to forget
	for _, wide := range []string{"0.0.0.0/0", "::/0", "10.0.0.0/7"} {
		if _, errs, rc := admin(t, d, "forget", "--admin-token-file", tok, wide); rc != 2 || !strings.Contains(errs, "repeat with --force") {
			t.Errorf("forget %s: rc=%d %q, want a refusal", wide, rc, errs)
		}
	}
	if out, errs, rc := admin(t, d, "forget", "--admin-token-file", tok, "--force", "0.0.0.0/0"); rc != 0 || !strings.Contains(out, "0.0.0.0/0: deleted") {
		t.Errorf("forget --force 0.0.0.0/0: rc=%d %q %q", rc, out, errs)
	}
	if out, _, rc := admin(t, d, "forget", "--admin-token-file", tok, "10.0.0.0/8"); rc != 0 {
		t.Errorf("forget of a /8 without --force: rc=%d %q", rc, out)
	}

	// Without a token, a TCP request for Host "policyd" is refused.
	d2 := startDaemon(t, "--state-dir", t.TempDir())
	c, err := net.Dial("tcp", d2.http)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	fmt.Fprintf(c, "GET /api/v1/clients/192.0.2.1 HTTP/1.1\r\nHost: policyd\r\nConnection: close\r\n\r\n")
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusForbidden {
		t.Errorf("Host: policyd over TCP answered %d, want 403", resp.StatusCode)
	}
}

// A network with more records than one answer carries is inspected a page
// at a time: 1000 records, then the rest after the key the page ends at.
func TestInspectPages(t *testing.T) {
	d := startDaemon(t, "--state-dir", t.TempDir())
	c, err := net.Dial("tcp", d.policy)
	if err != nil {
		t.Fatal(err)
	}
	br := bufio.NewReader(c)
	for i := range 1001 {
		policyAsk(t, c, br, "protocol_state=RCPT", fmt.Sprintf("client_address=10.1.%d.%d", i/256, i%256), "client_port=1",
			"sender=s@example.org", "recipient=r@example.test")
	}
	c.Close()
	out, errs, rc := admin(t, d, "inspect", "10.0.0.0/8")
	if rc != 0 || !strings.Contains(out, "10.0.0.0/8: 1000 records") || !strings.Contains(out, "more records: policyd inspect --after '") {
		t.Fatalf("first page: rc=%d %s\n%s", rc, errs, testsync.Tail(out, 3))
	}
	after := out[strings.Index(out, "--after '")+len("--after '"):]
	after = after[:strings.IndexByte(after, '\'')]
	out, errs, rc = admin(t, d, "inspect", "--after", after, "10.0.0.0/8")
	if rc != 0 || !strings.Contains(out, "10.0.0.0/8: 1 record") || strings.Contains(out, "more records") {
		t.Fatalf("second page: rc=%d %s\n%s", rc, errs, out)
	}
}

// policyd chain shows the chain the daemon serves with; after a refused
// reload, that it is the one from before it, and why.
func TestChainCommand(t *testing.T) {
	cfg := t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("connection_shaper threshold 7\n"), 0o644)
	d := startDaemon(t, "--config", cfg, "--state-dir", t.TempDir())
	out, errs, rc := admin(t, d, "chain")
	if rc != 0 || !strings.Contains(out, "connection_shaper") || !strings.Contains(out, "threshold=7") || strings.Contains(out, "refused") {
		t.Fatalf("chain: rc=%d %q %q", rc, out, errs)
	}
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("no_such_rule\n"), 0o644)
	if err := d.cmd.Process.Signal(syscall.SIGHUP); err != nil {
		t.Fatal(err)
	}
	d.log.waitFor(t, "reload refused", 1)
	out, _, rc = admin(t, d, "chain")
	if rc != 0 || !strings.Contains(out, "threshold=7") || !strings.Contains(out, "the last reload") || !strings.Contains(out, "was refused") {
		t.Fatalf("chain after a refused reload: rc=%d %q", rc, out)
	}
}

// inspect shows a greylist entry in words (state, times as durations),
// and points out the triplet of the sender and recipient an admin names;
// before, it showed a hash and "g:<unix milliseconds>".
func TestInspectGreylisting(t *testing.T) {
	cfg := t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("greylisting\n"), 0o644)
	d := startDaemon(t, "--config", cfg, "--state-dir", t.TempDir())
	const client = "192.0.2.70"
	if got := askPolicy(t, d.policy, client, "1", "a@example.org"); !strings.HasPrefix(got, "action=450 4.7.1") {
		t.Fatalf("first attempt: %s", got)
	}
	askPolicy(t, d.policy, client, "2", "b@example.org")
	out, errs, rc := admin(t, d, "inspect", client, "--sender", "A@example.org", "--recipient", "<r@example.test>")
	if rc != 0 {
		t.Fatalf("inspect: rc=%d %s", rc, errs)
	}
	mine := regexp.MustCompile(`greylisting +192\.0\.2\.0/24 +string +3h\d+m\d+s +the triplet of sender <a@example\.org>, recipient <r@example\.test>: grey: first seen \d+s ago; a retry passes in \d+m\d+s \(and until 3h\d+m\d+s from now\)`)
	if !mine.MatchString(out) || strings.Count(out, "the triplet of") != 1 || strings.Count(out, "grey: first seen") != 2 || strings.Contains(out, "g:") {
		t.Errorf("inspect --sender --recipient:\n%s", out)
	}
}
