package main

import (
	"encoding/json"
	"strings"
	"testing"
)

func sampleReport() Report {
	return Report{
		Proto: "policy", Target: "127.0.0.1:10040", Concurrency: 16, Clients: 1000, IPv6: 0.2,
		Seconds: 5, Unit: "request", Ops: 100000, Rate: 20000, Sessions: 15000, Requests: 100000,
		Latency: Latency{P50: 420, P99: 2100, P999: 6400, Max: 1.25e6},
		Errors:  2, ErrorSet: []string{"policy read: EOF"},
		Answers: map[string]int64{"DUNNO": 99000, "450": 900, "DEFER_IF_PERMIT": 100},
	}
}

func TestWriteText(t *testing.T) {
	var b strings.Builder
	if err := sampleReport().writeText(&b); err != nil {
		t.Fatal(err)
	}
	want := `policy load on 127.0.0.1:10040: c=16, 1000 clients (20% IPv6), 5.0s
done      100000 requests, 20000/s (15000 sessions, 100000 round trips)
latency   p50 420µs  p99 2.10ms  p99.9 6.40ms  max 1.25s
errors    2
          policy read: EOF
answers
          DUNNO                 99000   99.0%
          450                     900    0.9%
          DEFER_IF_PERMIT         100    0.1%
`
	if b.String() != want {
		t.Errorf("text report:\n%s\nwant:\n%s", b.String(), want)
	}
}

func TestWriteJSON(t *testing.T) {
	var b strings.Builder
	if err := sampleReport().writeJSON(&b); err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal([]byte(b.String()), &m); err != nil {
		t.Fatal(err)
	}
	// The names scripts/bench.sh and scripts/soak.sh read.
	for _, k := range []string{"proto", "target", "concurrency", "rate", "ops", "errors", "answers", "latency"} {
		if _, ok := m[k]; !ok {
			t.Errorf("JSON report lacks %q: %s", k, b.String())
		}
	}
	lat := m["latency"].(map[string]any)
	for k, want := range map[string]float64{"p50_us": 420, "p99_us": 2100, "p999_us": 6400, "max_us": 1.25e6} {
		if lat[k] != want {
			t.Errorf("latency %s = %v, want %v", k, lat[k], want)
		}
	}
}

func TestFmtUS(t *testing.T) {
	for v, want := range map[float64]string{0: "0µs", 999: "999µs", 1000: "1.00ms", 1234567: "1.23s"} {
		if got := fmtUS(v); got != want {
			t.Errorf("fmtUS(%v) = %q, want %q", v, got, want)
		}
	}
}
