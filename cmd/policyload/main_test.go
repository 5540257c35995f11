package main

import (
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

func runJSON(t *testing.T, args ...string) Report {
	t.Helper()
	var out, errs strings.Builder
	if code := run(t.Context(), append(args, "-json"), &out, &errs); code != 0 {
		t.Fatalf("policyload %s: exit %d: %s", strings.Join(args, " "), code, errs.String())
	}
	var r Report
	if err := json.Unmarshal([]byte(out.String()), &r); err != nil {
		t.Fatalf("report: %v\n%s", err, out.String())
	}
	return r
}

// A brief run against each in-process baseline: everything answered,
// nothing failed, every answer the no-op one.
func TestBaselines(t *testing.T) {
	for _, tc := range []struct {
		proto, answer, unit string
	}{
		{"policy", "DUNNO", "request"},
		{"milter", "continue", "session"},
	} {
		t.Run(tc.proto, func(t *testing.T) {
			t.Parallel()
			r := runJSON(t, "-baseline", "-baseline-in-process", "-proto", tc.proto, "-c", "3", "-duration", "300ms", "-clients", "50", "-ipv6", "0.5")
			if r.Target != "baseline" || r.Unit != tc.unit || r.Concurrency != 3 {
				t.Errorf("report header: %+v", r)
			}
			if r.Ops == 0 || r.Errors != 0 || r.Rate <= 0 {
				t.Errorf("ops %d, errors %d %q, rate %v", r.Ops, r.Errors, r.ErrorSet, r.Rate)
			}
			if len(r.Answers) != 1 || r.Answers[tc.answer] != r.Ops {
				t.Errorf("answers %v, want only %s", r.Answers, tc.answer)
			}
			if r.Latency.P50 <= 0 || r.Latency.P50 > r.Latency.P99 || r.Latency.P99 > r.Latency.P999 || r.Latency.P999 > r.Latency.Max {
				t.Errorf("latency not ordered: %+v", r.Latency)
			}
			if r.Requests < r.Sessions {
				t.Errorf("%d round trips for %d sessions", r.Requests, r.Sessions)
			}
		})
	}
}

// -fill gives each client one session and stops on its own, well before
// the duration.
func TestFill(t *testing.T) {
	for _, proto := range []string{"policy", "milter"} {
		t.Run(proto, func(t *testing.T) {
			t.Parallel()
			r := runJSON(t, "-baseline", "-baseline-in-process", "-proto", proto, "-fill", "-clients", "40", "-c", "4", "-duration", "1m")
			if r.Sessions != 40 || r.Errors != 0 {
				t.Errorf("%d sessions, %d errors (%q), want 40 and none", r.Sessions, r.Errors, r.ErrorSet)
			}
			if r.Seconds > 30 {
				t.Errorf("ran %.1fs: did not stop when the pool was done", r.Seconds)
			}
		})
	}
}

func TestTextReport(t *testing.T) {
	var out, errs strings.Builder
	if code := run(t.Context(), []string{"-baseline", "-baseline-in-process", "-duration", "100ms", "-c", "1", "-states", "RCPT,END-OF-MESSAGE"}, &out, &errs); code != 0 {
		t.Fatalf("exit %d: %s", code, errs.String())
	}
	for _, want := range []string{"policy load on baseline: c=1", "latency   p50", "DUNNO"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("report lacks %q:\n%s", want, out.String())
		}
	}
}

func TestBadFlags(t *testing.T) {
	for _, args := range [][]string{
		{"-proto", "smtp"},
		{"-c", "0"},
		{"-clients", "0"},
		{"-ipv6", "2"},
		{"-states", "QUIT"},
		{"-duration", "0s"},
		{"-addr", "192.0.2.1:10040"}, // not loopback
		{"-addr", "nonsense"},
		{"extra"},
	} {
		var out, errs strings.Builder
		if code := run(t.Context(), args, &out, &errs); code != 2 {
			t.Errorf("policyload %q: exit %d, want 2 (%s)", args, code, errs.String())
		}
	}
}

// Nothing listening: every dial fails, the run says so and fails.
func TestNoServer(t *testing.T) {
	b, err := startBaseline("policy")
	if err != nil {
		t.Fatal(err)
	}
	addr := b.addr()
	if err := b.close(); err != nil {
		t.Fatal(err)
	}
	var out, errs strings.Builder
	code := run(t.Context(), []string{"-addr", addr, "-duration", "100ms", "-c", "1", "-json"}, &out, &errs)
	if code != 1 || !strings.Contains(errs.String(), "nothing was answered") {
		t.Errorf("exit %d, stderr %q", code, errs.String())
	}
	var r Report
	if err := json.Unmarshal([]byte(out.String()), &r); err != nil || r.Errors == 0 || len(r.ErrorSet) == 0 {
		t.Errorf("report %+v, %v: want the dial errors", r, err)
	}
}

// -baseline starts the no-op server as a child process of the built
// binary, loads it, and stops it.
func TestBaselineProcess(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "policyload")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	for _, proto := range []string{"policy", "milter"} {
		out, err := exec.Command(bin, "-baseline", "-proto", proto, "-c", "2", "-duration", "200ms", "-clients", "10", "-json").Output()
		if err != nil {
			t.Fatalf("%s: %v", proto, err)
		}
		var r Report
		if err := json.Unmarshal(out, &r); err != nil || r.Target != "baseline" || r.Ops == 0 || r.Errors != 0 {
			t.Fatalf("%s: %+v %v\n%s", proto, r, err, out)
		}
	}
}
