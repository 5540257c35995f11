package postfixpolicy

import (
	"container/list"
	"context"
	"sync"
	"time"

	"github.com/policyd-mail/policyd/rules"
)

// sessionKey recognises one SMTP session across requests. Several MTAs
// may share one policyd, so the server side is part of it.
type sessionKey struct {
	client, port, server, sport string
}

// tracked is one session's replay state: what the policy protocol needs
// on top of the shared session model. Its mutex serialises the requests
// of one session; Postfix sends them one at a time anyway.
type tracked struct {
	mu     sync.Mutex
	key    sessionKey
	s      *rules.Conversation
	elem   *list.Element
	seen   time.Time // last request, for idle expiry; guarded by tracker.mu
	closed bool      // evicted: the session is over

	instance string // Postfix's instance of the open transaction ("" until RCPT)
	lastDone string // the instance whose END-OF-MESSAGE was answered
	pid      string // the smtpd process of this session, from the instance
	rcptRun  bool   // the rcpt hook ran in the open transaction
	sawRcpt  bool   // a RCPT request came in this session (wiring.go)
	prev     requestSig
	prevOut  outcome
}

// restart forgets the ended session and tracks sess under the same key.
func (ts *tracked) restart(sess *rules.Conversation) {
	ts.s = sess
	ts.instance, ts.lastDone, ts.pid = "", "", ""
	ts.rcptRun, ts.sawRcpt = false, false
	ts.prev, ts.prevOut = requestSig{}, outcome{}
}

// requestSig identifies a request well enough to recognise the same
// question asked twice in a row (the policy service listed in two
// restriction lists).
type requestSig struct {
	state, instance, sender, recipient, helo string
}

func sigOf(r *Request) requestSig {
	return requestSig{r.ProtocolState, r.Instance, r.Sender, r.Recipient, r.HeloName}
}

// tracker remembers sessions by key, bounded in number and idle time.
type tracker struct {
	mu    sync.Mutex
	m     map[sessionKey]*tracked
	lru   *list.List // front = most recently used
	max   int
	idle  time.Duration
	onEnd func(*tracked) // runs the ending hooks of an evicted session, outside mu
	// overflow, when set, learns of sessions ended early over max, outside mu.
	overflow func(n int)
}

func newTracker(max int, idle time.Duration, onEnd func(*tracked)) *tracker {
	return &tracker{m: make(map[sessionKey]*tracked), lru: list.New(), max: max, idle: idle, onEnd: onEnd}
}

// get returns the session for key, creating it with mk. It also evicts
// sessions over the bound or idle too long.
func (t *tracker) get(key sessionKey, now time.Time, mk func() *rules.Conversation) *tracked {
	t.mu.Lock()
	ts, ok := t.m[key]
	if ok {
		ts.seen = now
		t.lru.MoveToFront(ts.elem)
		t.mu.Unlock()
		return ts
	}
	ts = &tracked{key: key, s: mk(), seen: now}
	ts.elem = t.lru.PushFront(ts)
	t.m[key] = ts
	var ended []*tracked
	for t.lru.Len() > t.max {
		ended = append(ended, t.removeLocked(t.lru.Back().Value.(*tracked)))
	}
	t.mu.Unlock()
	if len(ended) > 0 && t.overflow != nil {
		t.overflow(len(ended))
	}
	for _, e := range ended {
		t.onEnd(e)
	}
	return ts
}

// expire ends sessions idle for longer than the idle time.
func (t *tracker) expire(now time.Time) int {
	var ended []*tracked
	t.mu.Lock()
	for e := t.lru.Back(); e != nil; {
		ts := e.Value.(*tracked)
		if now.Sub(ts.seen) < t.idle {
			break
		}
		e = e.Prev()
		ended = append(ended, t.removeLocked(ts))
	}
	t.mu.Unlock()
	for _, e := range ended {
		t.onEnd(e)
	}
	return len(ended)
}

// drain ends every session (shutdown) until ctx ends, and returns how
// many it had to leave without their ending hooks.
func (t *tracker) drain(ctx context.Context) int {
	t.mu.Lock()
	var ended []*tracked
	for e := t.lru.Back(); e != nil; e = t.lru.Back() {
		ended = append(ended, t.removeLocked(e.Value.(*tracked)))
	}
	t.mu.Unlock()
	for i, e := range ended {
		if ctx.Err() != nil {
			return len(ended) - i
		}
		t.onEnd(e)
	}
	return 0
}

// end ends the session under key now, if it is still tracked.
func (t *tracker) end(key sessionKey) {
	t.mu.Lock()
	ts, ok := t.m[key]
	if ok {
		t.removeLocked(ts)
	}
	t.mu.Unlock()
	if ok {
		t.onEnd(ts)
	}
}

func (t *tracker) removeLocked(ts *tracked) *tracked {
	t.lru.Remove(ts.elem)
	delete(t.m, ts.key)
	return ts
}

func (t *tracker) len() int {
	t.mu.Lock()
	defer t.mu.Unlock()
	return len(t.m)
}
