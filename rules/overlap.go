package rules

import (
	"net/netip"
	"sync"
	"time"
)

// Overlap notices one SMTP session reaching the chain through both
// front-ends: the same client address and port, within a few seconds,
// by milter and by policy. That is one daemon wired into smtpd_milters
// and check_policy_service at once, which counts every session twice
// (connection_shaper), every message twice (client_stats) and holds two
// hosts_allow slots. Set it in Options; front-ends report every session
// start through NewConversation.
type Overlap struct {
	// Found is called at every session seen through both (a counter).
	Found func()
	// Warn is called once, for the first one.
	Warn func(client netip.Addr, port int)

	mu sync.Mutex
	// Two generations of sessions seen: cur since rotated, prev the
	// window before. Rotating drops prev whole, so no session start
	// waits on a sweep of the map under the lock.
	cur, prev map[overlapKey]overlapSeen
	rotated   time.Time
	once      sync.Once
}

type overlapKey struct {
	client netip.Addr
	port   int
}

type overlapSeen struct {
	protocol string
	at       time.Time
}

// overlapWindow is how far apart the two front-ends may see one session:
// Postfix talks to its milter at connect and to the policy service at the
// first restriction, moments later.
const overlapWindow = 30 * time.Second

// overlapMax bounds the sessions a generation remembers (~3 MB): past
// it, new ones go unwatched until the next rotation; detection is a
// hint, not a count.
const overlapMax = 1 << 15

func (o *Overlap) saw(protocol string, client netip.Addr, port int, now time.Time) {
	if o == nil || port == 0 || !client.IsValid() {
		return
	}
	k := overlapKey{client, port}
	o.mu.Lock()
	if o.cur == nil || now.Sub(o.rotated) > overlapWindow {
		// A session seen at most a window ago is in one of the two.
		o.prev, o.cur, o.rotated = o.cur, make(map[overlapKey]overlapSeen, len(o.cur)), now
	}
	prev, ok := o.cur[k]
	if !ok {
		prev, ok = o.prev[k]
	}
	if len(o.cur) < overlapMax {
		o.cur[k] = overlapSeen{protocol, now}
	}
	o.mu.Unlock()
	if !ok || prev.protocol == protocol || now.Sub(prev.at) > overlapWindow {
		return
	}
	if o.Found != nil {
		o.Found()
	}
	if o.Warn != nil {
		o.once.Do(func() { o.Warn(client, port) })
	}
}
