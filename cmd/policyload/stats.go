package main

import (
	"math/bits"
	"time"
)

// subBits sets the histogram's precision: each power of two is split in
// 2^subBits buckets, so a percentile is off by at most 1/128 (0.8 %).
// A histogram instead of every sample keeps a ten-minute soak in a
// fixed 40 KiB per worker.
const (
	subBits  = 7
	subCount = 1 << subBits
	// maxExp covers 2^(maxExp+subBits) ns, about 2^47 ns = 39 hours.
	maxExp = 40
)

// histogram records latencies in nanoseconds.
type histogram struct {
	counts [(maxExp + 1) * subCount]int64
	n      int64
	max    time.Duration
}

// bucketOf maps v to its bucket: values below subCount have a bucket of
// their own; above, the top subBits+1 bits of v pick it.
func bucketOf(v int64) int {
	if v < subCount {
		if v < 0 {
			return 0
		}
		return int(v)
	}
	e := bits.Len64(uint64(v)) - subBits - 1
	if e >= maxExp {
		return len(histogram{}.counts) - 1
	}
	return (e+1)*subCount + int(v>>e) - subCount
}

// bucketMax is the largest value that falls in bucket i.
func bucketMax(i int) int64 {
	if i < subCount {
		return int64(i)
	}
	e := i/subCount - 1
	m := int64(i%subCount + subCount)
	return (m+1)<<e - 1
}

func (h *histogram) add(d time.Duration) {
	h.counts[bucketOf(int64(d))]++
	h.n++
	if d > h.max {
		h.max = d
	}
}

func (h *histogram) merge(o *histogram) {
	for i, c := range o.counts {
		h.counts[i] += c
	}
	h.n += o.n
	h.max = max(h.max, o.max)
}

// quantile returns the smallest recorded value v (within the bucket
// precision) such that at least q of the samples are <= v. It never
// reports more than the largest sample.
func (h *histogram) quantile(q float64) time.Duration {
	if h.n == 0 {
		return 0
	}
	rank := int64(q*float64(h.n) + 0.999999999)
	rank = min(max(rank, 1), h.n)
	var seen int64
	for i, c := range h.counts {
		seen += c
		if seen >= rank {
			return min(time.Duration(bucketMax(i)), h.max)
		}
	}
	return h.max
}

// recorder is one worker's tally; workers never share one, so nothing
// on the hot path takes a lock.
type recorder struct {
	lat      histogram
	ops      int64 // what the rate counts: requests (policy) or sessions (milter)
	sessions int64
	requests int64 // protocol round trips answered
	answers  map[string]int64
	errors   int64
	errSeen  []string
}

// maxErrSamples bounds the distinct error texts a report lists.
const maxErrSamples = 5

func newRecorder() *recorder { return &recorder{answers: map[string]int64{}} }

func (r *recorder) fail(err error) {
	r.errors++
	if len(r.errSeen) >= maxErrSamples {
		return
	}
	msg := err.Error()
	for _, s := range r.errSeen {
		if s == msg {
			return
		}
	}
	r.errSeen = append(r.errSeen, msg)
}

func (r *recorder) merge(o *recorder) {
	r.lat.merge(&o.lat)
	r.ops += o.ops
	r.sessions += o.sessions
	r.requests += o.requests
	r.errors += o.errors
	for k, v := range o.answers {
		r.answers[k] += v
	}
	for _, e := range o.errSeen {
		if len(r.errSeen) >= maxErrSamples {
			break
		}
		dup := false
		for _, s := range r.errSeen {
			dup = dup || s == e
		}
		if !dup {
			r.errSeen = append(r.errSeen, e)
		}
	}
}
