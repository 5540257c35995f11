package main

import (
	"fmt"
	"testing"
	"time"
)

func TestBucketBounds(t *testing.T) {
	for _, v := range []int64{0, 1, 127, 128, 255, 256, 257, 1000, 123456, 1 << 30, 1<<40 + 12345} {
		i := bucketOf(v)
		if hi := bucketMax(i); hi < v {
			t.Errorf("bucketMax(bucketOf(%d)) = %d, below the value", v, hi)
		}
		if i > 0 && bucketMax(i-1) >= v {
			t.Errorf("value %d also fits bucket %d (max %d)", v, i-1, bucketMax(i-1))
		}
		if hi := bucketMax(i); float64(hi-v) > float64(v)/subCount {
			t.Errorf("bucket of %d reaches %d: more than 1/%d above", v, hi, subCount)
		}
	}
}

func TestQuantile(t *testing.T) {
	seq := func(from, to time.Duration, step time.Duration) []time.Duration {
		var out []time.Duration
		for d := from; d <= to; d += step {
			out = append(out, d)
		}
		return out
	}
	for _, tc := range []struct {
		name    string
		samples []time.Duration
		q       float64
		want    time.Duration
		tol     float64 // relative
	}{
		{"empty", nil, 0.5, 0, 0},
		{"one", []time.Duration{42}, 0.999, 42, 0},
		{"exact small p50", seq(1, 100, 1), 0.50, 50, 0},
		{"exact small p99", seq(1, 100, 1), 0.99, 99, 0},
		{"exact small max", seq(1, 100, 1), 1, 100, 0},
		{"p50 of 1..1000µs", seq(time.Microsecond, time.Millisecond, time.Microsecond), 0.50, 500 * time.Microsecond, 1.0 / subCount},
		{"p99 of 1..1000µs", seq(time.Microsecond, time.Millisecond, time.Microsecond), 0.99, 990 * time.Microsecond, 1.0 / subCount},
		{"p99.9 of 1..1000µs", seq(time.Microsecond, time.Millisecond, time.Microsecond), 0.999, 999 * time.Microsecond, 1.0 / subCount},
		{"never above max", []time.Duration{time.Millisecond, 1000001 * time.Nanosecond}, 1, 1000001 * time.Nanosecond, 0},
		{"tail outlier", append(seq(100*time.Microsecond, 100*time.Microsecond, 1), time.Second), 0.5, 100 * time.Microsecond, 1.0 / subCount},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var h histogram
			for _, s := range tc.samples {
				h.add(s)
			}
			got := h.quantile(tc.q)
			if diff := float64(got - tc.want); diff < 0 || diff > tc.tol*float64(tc.want) {
				t.Errorf("quantile(%v) = %v, want %v (+%.1f%%)", tc.q, got, tc.want, 100*tc.tol)
			}
		})
	}
}

func TestRecorderMerge(t *testing.T) {
	a, b := newRecorder(), newRecorder()
	a.lat.add(time.Millisecond)
	b.lat.add(3 * time.Millisecond)
	a.ops, b.ops = 1, 2
	a.answers["DUNNO"], b.answers["DUNNO"], b.answers["450"] = 1, 1, 1
	for i := range maxErrSamples + 2 {
		a.fail(fmt.Errorf("error %d", i%2))
		b.fail(fmt.Errorf("error %d", i))
	}
	a.merge(b)
	if a.lat.n != 2 || a.lat.max != 3*time.Millisecond || a.ops != 3 {
		t.Errorf("merged: n=%d max=%v ops=%d", a.lat.n, a.lat.max, a.ops)
	}
	if a.answers["DUNNO"] != 2 || a.answers["450"] != 1 {
		t.Errorf("answers: %v", a.answers)
	}
	if a.errors != 2*(maxErrSamples+2) || len(a.errSeen) != maxErrSamples {
		t.Errorf("errors: %d, samples %q", a.errors, a.errSeen)
	}
	seen := map[string]bool{}
	for _, e := range a.errSeen {
		if seen[e] {
			t.Errorf("sample %q twice", e)
		}
		seen[e] = true
	}
}
