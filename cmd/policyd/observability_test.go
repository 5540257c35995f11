package main

import (
	"bufio"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
)

// scrape GETs the daemon's /metrics.
func scrape(t testing.TB, d *proc) string {
	t.Helper()
	resp, err := http.Get("http://" + d.http + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %d %v", resp.StatusCode, err)
	}
	return string(body)
}

// hasSeries fails unless body holds each line whole, or, for a pattern
// starting with ~, a line matching that regular expression.
func hasSeries(t testing.TB, body string, lines ...string) {
	t.Helper()
	for _, l := range lines {
		if re, ok := strings.CutPrefix(l, "~"); ok {
			if !regexp.MustCompile(`(?m)^` + re + `$`).MatchString(body) {
				t.Errorf("/metrics has no line matching\n  %s", re)
			}
			continue
		}
		if !strings.Contains(body, "\n"+l+"\n") {
			t.Errorf("/metrics lacks\n  %s", l)
		}
	}
	if t.Failed() {
		t.Logf("/metrics:\n%s", body)
	}
}

// The real binary, real policy traffic, a refused reload, then /metrics:
// the SPEC §7 series with their labels and values, promlint-clean, and no
// client address anywhere.
func TestMetricsAfterTraffic(t *testing.T) {
	cfg := t.TempDir()
	plugins := filepath.Join(cfg, "plugins")
	os.WriteFile(plugins, []byte("connection_shaper:1 threshold 1 dry_run 1\nconnection_shaper threshold 1\n"), 0o644)
	d := startDaemon(t, "--config", cfg, "--milter-listen", "127.0.0.1:0")

	c, err := net.Dial("tcp", d.policy)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	ask := func(port string) string {
		return policyAsk(t, c, br, "protocol_state=RCPT", "client_address=192.0.2.1", "client_port="+port,
			"helo_name=mx.example.org", "sender=s@example.org", "recipient=r@example.test")
	}
	if got := ask("1"); got != "action=DUNNO" {
		t.Fatalf("first session: %s", got)
	}
	if got := ask("2"); !strings.HasPrefix(got, "action=450 4.7.1 Too many connections") {
		t.Fatalf("second session: %s", got)
	}

	os.WriteFile(plugins, []byte("connection_shaper threshold x\n"), 0o644)
	d.cmd.Process.Signal(syscall.SIGHUP)
	d.log.waitFor(t, "reload refused", 1)

	body := scrape(t, d)
	hasSeries(t, body,
		`policyd_decisions_total{answer="DENYSOFT",dry_run="false",hook="connect",protocol="policy",rule="connection_shaper"} 1`,
		`policyd_decisions_total{answer="DENYSOFT",dry_run="true",hook="connect",protocol="policy",rule="connection_shaper:1"} 1`,
		`policyd_hook_duration_seconds_count{hook="connect",protocol="policy"} 2`,
		`~policyd_hook_duration_seconds_bucket\{hook="connect",protocol="policy",le="\+Inf"\} 2`,
		`~policyd_hook_duration_seconds_count\{hook="rcpt",protocol="policy"\} [1-9]\d*`,
		`~policyd_sessions_open\{protocol="policy"\} [12]`,
		`policyd_sessions_open{protocol="milter"} 0`,
		`policyd_store_operations_total{op="incr",result="ok"} 4`,
		`policyd_store_operations_total{op="incr",result="unavailable"} 0`,
		`policyd_store_duration_seconds_count{op="incr"} 4`,
		`policyd_config_reloads_total{result="failure"} 1`,
		`policyd_config_reloads_total{result="success"} 0`,
		`~policyd_build_info\{goversion="go1\.[0-9.]+",version="[^"]+"\} 1`,
		`~go_goroutines \d+`,
		`~process_resident_memory_bytes \S+`,
	)
	if strings.Contains(body, "192.0.2.1") || strings.Contains(body, "example.") {
		t.Errorf("a client address, HELO or address in /metrics:\n%s", body)
	}
	problems, err := promlint.New(strings.NewReader(body)).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
	if rc := d.stop(t); rc != 0 {
		t.Fatalf("exit code %d", rc)
	}
}

// --log-format json end to end: every line the daemon writes is one JSON
// object, and a refusal's decision line has the stable keys.
func TestJSONDecisionLog(t *testing.T) {
	cfg := t.TempDir()
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("connection_shaper threshold 1\n"), 0o644)
	d := startDaemon(t, "--config", cfg, "--log-format", "json")
	c, err := net.Dial("tcp", d.policy)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	for port, want := range []string{"action=DUNNO", "action=450 4.7.1 Too many connections"} {
		got := policyAsk(t, c, br, "protocol_state=RCPT", "client_address=192.0.2.7", "client_port="+string(rune('1'+port)),
			"helo_name=mx.example.org", "sender=s@example.org", "recipient=r@example.test", "queue_id=4AbCdE")
		if !strings.HasPrefix(got, want) {
			t.Fatalf("session %d: %s", port+1, got)
		}
	}
	d.log.waitFor(t, `"msg":"decision"`, 1)
	if rc := d.stop(t); rc != 0 {
		t.Fatalf("exit code %d", rc)
	}

	var decisions []map[string]any
	for _, line := range strings.Split(strings.TrimSpace(d.log.String()), "\n") {
		var rec map[string]any
		if err := json.Unmarshal([]byte(line), &rec); err != nil {
			t.Fatalf("not a JSON line: %q: %v", line, err)
		}
		for _, k := range []string{"time", "level", "msg"} {
			if _, ok := rec[k]; !ok {
				t.Errorf("line without %q: %s", k, line)
			}
		}
		if rec["msg"] == "decision" {
			decisions = append(decisions, rec)
		}
	}
	if len(decisions) != 1 {
		t.Fatalf("%d decision lines, want 1:\n%s", len(decisions), d.log.String())
	}
	rec := decisions[0]
	for _, k := range []string{"queue_id", "client", "client_name", "helo", "sender", "recipient", "hook", "rule", "answer", "text", "delay", "dry_run"} {
		if _, ok := rec[k]; !ok {
			t.Errorf("decision line lacks %q: %v", k, rec)
		}
	}
	want := map[string]any{
		"level": "INFO", "client": "192.0.2.7", "hook": "connect", "rule": "connection_shaper",
		"answer": "DENYSOFT", "dry_run": false, "protocol": "policy",
		"text": "Too many connections from your address (more than 1 in 1m0s), please try again later",
	}
	for k, v := range want {
		if rec[k] != v {
			t.Errorf("decision %s = %#v, want %#v", k, rec[k], v)
		}
	}
	// slog's JSON handler writes a duration as integer nanoseconds.
	if _, ok := rec["delay"].(float64); !ok {
		t.Errorf("delay = %#v, want a number of nanoseconds", rec["delay"])
	}
}
