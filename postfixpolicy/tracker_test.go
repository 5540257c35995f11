package postfixpolicy

import (
	"context"
	"net/netip"
	"strconv"
	"sync/atomic"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/rules"
)

// ends counts the ending hooks run for evicted sessions; each test that
// uses it resets it.
type ends struct{ resets, disconnects atomic.Int64 }

var endCounter ends

type endProbe struct{}

func (endProbe) Mail(context.Context, *rules.Session) (rules.Result, error) {
	return rules.Result{}, nil
}

func (endProbe) ResetTransaction(context.Context, *rules.Session) error {
	endCounter.resets.Add(1)
	return nil
}

func (endProbe) Disconnect(context.Context, *rules.Session) error {
	endCounter.disconnects.Add(1)
	return nil
}

func init() {
	rules.Register(rules.Definition{Name: "end_probe", Setup: func(*rules.Binder, rules.Env) (any, error) { return endProbe{}, nil }})
}

func TestTrackerBoundsAndEnds(t *testing.T) {
	endCounter.resets.Store(0)
	endCounter.disconnects.Store(0)
	c := loadChain(t, map[string]string{"plugins": "end_probe\n"})
	now := time.Unix(1_000_000, 0)
	srv := &Server{}
	tr := newTracker(3, time.Minute, srv.endSession)
	mk := func() *rules.Conversation {
		return rules.NewConversation(c, "policy", netip.MustParseAddr("192.0.2.1"), 1, now)
	}
	ctx := context.Background()
	var keep []*tracked
	for i := range 5 {
		ts := tr.get(sessionKey{client: "192.0.2.1", port: strconv.Itoa(i)}, now, mk)
		ts.s.Connect(ctx)
		if i == 4 {
			ts.s.Mail(ctx, rules.MailFrom{Sender: "a@example.org"})
		}
		keep = append(keep, ts)
	}
	if tr.len() != 3 {
		t.Fatalf("tracker holds %d sessions, bound is 3", tr.len())
	}
	if got := endCounter.disconnects.Load(); got != 2 {
		t.Fatalf("%d disconnect hooks for 2 evicted sessions", got)
	}
	if !keep[0].closed || !keep[1].closed || keep[2].closed {
		t.Fatal("the least recently used sessions must be the evicted ones")
	}
	// Touching a session keeps it; the idle ones expire.
	tr.get(sessionKey{client: "192.0.2.1", port: "2"}, now.Add(50*time.Second), mk)
	if n := tr.expire(now.Add(70 * time.Second)); n != 2 {
		t.Fatalf("expired %d sessions, want 2", n)
	}
	if endCounter.resets.Load() != 1 || endCounter.disconnects.Load() != 4 {
		t.Fatalf("resets=%d disconnects=%d, want 1 and 4", endCounter.resets.Load(), endCounter.disconnects.Load())
	}
	tr.drain(context.Background())
	if tr.len() != 0 || endCounter.disconnects.Load() != 5 {
		t.Fatalf("after drain: %d sessions, %d disconnects", tr.len(), endCounter.disconnects.Load())
	}
}

func TestParseInstance(t *testing.T) {
	tests := []struct {
		in  string
		pid string
		seq uint64
		ok  bool
	}{
		{"1a2b.5f3c2d1e.9a8b7.0", "1a2b", 0, true},
		{"1a2b.5f3c2d1e.9a8b7.a", "1a2b", 10, true},
		{"x", "", 0, false},
		{"1.2.3.zz", "", 0, false},
	}
	for _, tc := range tests {
		pid, seq, ok := parseInstance(tc.in)
		if pid != tc.pid || seq != tc.seq || ok != tc.ok {
			t.Errorf("parseInstance(%q) = %q %d %v", tc.in, pid, seq, ok)
		}
	}
}
