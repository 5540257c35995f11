package main

import (
	"cmp"
	"encoding/json"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"time"
)

// Report is a run's result; its JSON form is what scripts read.
type Report struct {
	Proto       string  `json:"proto"`
	Target      string  `json:"target"` // "baseline" or the address
	Concurrency int     `json:"concurrency"`
	Clients     int     `json:"clients"`
	IPv6        float64 `json:"ipv6"`
	Seconds     float64 `json:"seconds"`
	// Unit is what Rate and the latencies count: "request" (policy) or
	// "session" (milter, from dial to QUIT).
	Unit     string  `json:"unit"`
	Ops      int64   `json:"ops"`
	Rate     float64 `json:"rate"`
	Sessions int64   `json:"sessions"`
	// Requests counts every answered round trip (milter: each command).
	Requests int64            `json:"requests"`
	Latency  Latency          `json:"latency"`
	Errors   int64            `json:"errors"`
	ErrorSet []string         `json:"error_samples,omitempty"`
	Answers  map[string]int64 `json:"answers"`
}

// Latency holds percentiles in microseconds.
type Latency struct {
	P50  float64 `json:"p50_us"`
	P99  float64 `json:"p99_us"`
	P999 float64 `json:"p999_us"`
	Max  float64 `json:"max_us"`
}

func us(d time.Duration) float64 { return float64(d.Nanoseconds()) / 1e3 }

func newReport(cfg *config, target string, rec *recorder, elapsed time.Duration) Report {
	r := Report{
		Proto: cfg.proto, Target: target, Concurrency: cfg.concurrency,
		Clients: cfg.gen.pool.n, IPv6: float64(cfg.gen.pool.v6) / float64(cfg.gen.pool.n),
		Seconds: elapsed.Seconds(), Unit: "request",
		Ops: rec.ops, Sessions: rec.sessions, Requests: rec.requests,
		Errors: rec.errors, ErrorSet: rec.errSeen, Answers: rec.answers,
		Latency: Latency{
			P50: us(rec.lat.quantile(0.50)), P99: us(rec.lat.quantile(0.99)),
			P999: us(rec.lat.quantile(0.999)), Max: us(rec.lat.max),
		},
	}
	if cfg.proto == "milter" {
		r.Unit = "session"
	}
	if elapsed > 0 {
		r.Rate = float64(rec.ops) / elapsed.Seconds()
	}
	return r
}

func (r Report) writeJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	if err := enc.Encode(r); err != nil {
		return fmt.Errorf("report: %w", err)
	}
	return nil
}

// writeText prints the report for a person. Answers are listed most
// frequent first, each with its share.
func (r Report) writeText(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "%s load on %s: c=%d, %d clients (%.0f%% IPv6), %.1fs\n",
		r.Proto, r.Target, r.Concurrency, r.Clients, 100*r.IPv6, r.Seconds)
	fmt.Fprintf(&b, "%-9s %d %ss, %.0f/s (%d sessions, %d round trips)\n", "done", r.Ops, r.Unit, r.Rate, r.Sessions, r.Requests)
	fmt.Fprintf(&b, "%-9s p50 %s  p99 %s  p99.9 %s  max %s\n", "latency",
		fmtUS(r.Latency.P50), fmtUS(r.Latency.P99), fmtUS(r.Latency.P999), fmtUS(r.Latency.Max))
	fmt.Fprintf(&b, "%-9s %d\n", "errors", r.Errors)
	for _, e := range r.ErrorSet {
		fmt.Fprintf(&b, "          %s\n", e)
	}
	var total int64
	for _, n := range r.Answers {
		total += n
	}
	names := slices.SortedFunc(maps.Keys(r.Answers), func(a, b string) int {
		return cmp.Or(cmp.Compare(r.Answers[b], r.Answers[a]), strings.Compare(a, b))
	})
	fmt.Fprintf(&b, "answers\n")
	for _, n := range names {
		fmt.Fprintf(&b, "          %-16s %10d  %5.1f%%\n", n, r.Answers[n], 100*float64(r.Answers[n])/float64(total))
	}
	_, err := io.WriteString(w, b.String())
	if err != nil {
		return fmt.Errorf("report: %w", err)
	}
	return nil
}

// fmtUS prints microseconds with a unit a person reads at a glance.
func fmtUS(v float64) string {
	switch {
	case v >= 1e6:
		return fmt.Sprintf("%.2fs", v/1e6)
	case v >= 1e3:
		return fmt.Sprintf("%.2fms", v/1e3)
	}
	return fmt.Sprintf("%.0fµs", v)
}
