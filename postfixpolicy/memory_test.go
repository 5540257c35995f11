package postfixpolicy

import (
	"bytes"
	"runtime"
	"strconv"
	"testing"

	"github.com/policyd-mail/policyd/rules"
)

// maxTrackedBytes bounds what the tracked sessions may hold at the
// default cap, so a flood of distinct client ports cannot grow the
// daemon past it. Before, the cap was 100 000 sessions of ~1.1 KB of heap
// each (~395 MB of RSS measured under a flood).
const maxTrackedBytes = 64 << 20

// What one tracked session costs, measured on sessions made by real RCPT
// requests, at the default cap.
func TestTrackedSessionsBounded(t *testing.T) {
	c := loadChain(t, map[string]string{"plugins": "connection_shaper threshold 1000000\n"})
	const n = 20000
	srv := New(Config{MaxSessions: n}, func() *rules.Chain { return c })
	defer srv.Shutdown(t.Context())
	runtime.GC()
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	for i := range n {
		b := bytes.Replace([]byte(rcptRequest), []byte("client_port=4711"), []byte("client_port="+strconv.Itoa(10000+i)), 1)
		b = bytes.Replace(b, []byte("client_address=192.0.2.10"), []byte("client_address=10.1."+strconv.Itoa(i/250)+"."+strconv.Itoa(i%250)), 1)
		var req Request
		if err := newReader(bytes.NewReader(b), DefaultLimits, nil).read(&req); err != nil {
			t.Fatal(err)
		}
		answerOne(srv, &req)
	}
	runtime.GC()
	runtime.ReadMemStats(&after)
	if srv.Sessions() != n {
		t.Fatalf("%d sessions tracked, want %d", srv.Sessions(), n)
	}
	per := float64(after.HeapAlloc-before.HeapAlloc) / n
	// The collector lets the heap grow to twice what is live (GOGC=100).
	atCap := 2 * per * DefaultMaxSessions
	t.Logf("%.0f bytes of heap per tracked session; at the default cap of %d: %.0f MB with the collector's headroom", per, DefaultMaxSessions, atCap/1e6)
	if atCap > maxTrackedBytes {
		t.Errorf("%d tracked sessions would take %.0f MB, more than %d MB", DefaultMaxSessions, atCap/1e6, maxTrackedBytes>>20)
	}
}
