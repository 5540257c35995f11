package listen

import (
	"context"
	"errors"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/policyd-mail/policyd/internal/ratelog"
)

// Gate is the connection handling both front-ends share, so each keeps
// only its protocol: the accept loop with its backoff and connection cap,
// the open connections, the rate-limited line for a dropped one, a rule's
// delay cut short by shutdown, and the shutdown drain.
//
// At the cap a new connection is not simply refused: the connection that
// has been silent longest, if it has been silent at least MinIdle, is
// closed to make room. Otherwise a few hundred slow or silent local
// clients would lock the MTA's own connections out until they time out.
type Gate struct {
	cfg      GateConfig
	log      *slog.Logger
	dropLog  *ratelog.Limiter // over the cap, refused
	evictLog *ratelog.Limiter // over the cap, a silent one closed
	badLog   *ratelog.Limiter // a connection dropped
	mu       sync.Mutex
	conns    map[*Conn]struct{}
	lns      map[net.Listener]struct{}
	shutting atomic.Bool
	wg       sync.WaitGroup
	stop     chan struct{}
	stopOnce sync.Once
	seq      atomic.Uint64
}

// GateConfig tunes a Gate. Zero values take the defaults.
type GateConfig struct {
	// Name is the front-end, in log lines ("policy", "milter").
	Name string
	// MaxConns bounds the open connections.
	MaxConns int
	// MinIdle is how long a connection must have been silent to be closed
	// for a new one at the cap; default 10s.
	MinIdle time.Duration
	// DrainIdle: Shutdown closes connections between requests at once and
	// cuts delays short (the policy protocol); otherwise it waits for
	// connections to end and cuts delays at its deadline (milter: one
	// connection is one SMTP session).
	DrainIdle bool
	// LimitHit counts a connection refused or closed at the cap (limit
	// LimitConns) and, through Dropped, the limit a dropped one hit.
	LimitHit func(limit string)
	LogEvery time.Duration
	Logger   *slog.Logger
}

// LimitConns is the limit label of a connection refused or closed at the cap.
const LimitConns = "connections"

// NewGate makes a gate.
func NewGate(cfg GateConfig) *Gate {
	if cfg.MinIdle == 0 {
		cfg.MinIdle = 10 * time.Second
	}
	if cfg.LimitHit == nil {
		cfg.LimitHit = func(string) {}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	every := max(cfg.LogEvery, 0)
	return &Gate{
		cfg:      cfg,
		log:      cfg.Logger,
		dropLog:  ratelog.New(every),
		evictLog: ratelog.New(every),
		badLog:   ratelog.New(every),
		conns:    map[*Conn]struct{}{},
		lns:      map[net.Listener]struct{}{},
		stop:     make(chan struct{}),
	}
}

// Conn is a connection the gate admitted. Release it when done.
type Conn struct {
	net.Conn
	ID   uint64
	Born time.Time
	// Owner is the front-end's own connection state, set once before the
	// connection is served, for Each.
	Owner any
	g     *Gate
	mu    sync.Mutex
	busy  bool
	shut  bool
	// active is when the connection last did something (unix ns).
	active  atomic.Int64
	evicted atomic.Bool
	once    sync.Once
}

// Evicted reports whether the gate closed the connection for a new one at
// the cap (and said so): its read error is not a client's fault.
func (c *Conn) Evicted() bool { return c.evicted.Load() }

// Touch marks activity: a packet or a request came.
func (c *Conn) Touch() { c.active.Store(time.Now().UnixNano()) }

// SetBusy marks a request in progress (or over). It reports false once
// shutdown began: the caller answers the request in progress, then ends.
func (c *Conn) SetBusy(b bool) bool {
	c.Touch()
	c.mu.Lock()
	defer c.mu.Unlock()
	c.busy = b
	return !c.shut
}

// Release closes the connection and frees its place, once.
func (c *Conn) Release() {
	c.Conn.Close()
	c.once.Do(func() {
		c.g.mu.Lock()
		delete(c.g.conns, c)
		c.g.mu.Unlock()
		c.g.wg.Done()
	})
}

// Listen registers ln for Shutdown to close; false once shutdown began.
func (g *Gate) Listen(ln net.Listener) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.shutting.Load() {
		return false
	}
	g.lns[ln] = struct{}{}
	return true
}

// Accept waits for the next connection on ln and admits it. It returns
// net.ErrClosed once ln is closed or shutdown began; other accept errors
// (out of descriptors) are logged and retried after a growing pause, as
// net/http does, rather than stop the front-end.
func (g *Gate) Accept(ln net.Listener) (*Conn, error) {
	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if g.shutting.Load() || errors.Is(err, net.ErrClosed) {
				return nil, net.ErrClosed
			}
			g.log.Error(g.cfg.Name+" accept failed", "err", err)
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		c, ok := g.admit(nc)
		if c == nil && !ok {
			nc.Close()
			return nil, net.ErrClosed
		}
		if c == nil {
			nc.Close()
			continue
		}
		return c, nil
	}
}

// admit tracks nc, making room at the cap; nil, true when it is refused,
// nil, false when shutdown began.
func (g *Gate) admit(nc net.Conn) (*Conn, bool) {
	now := time.Now()
	g.mu.Lock()
	if g.shutting.Load() {
		g.mu.Unlock()
		return nil, false
	}
	var victim *Conn
	var idle time.Duration
	if len(g.conns) >= g.cfg.MaxConns {
		victim, idle = g.longestIdle(now)
		if victim != nil {
			// Checked again under its own lock, and closed under it: a
			// request that began since is never cut.
			victim.mu.Lock()
			if victim.busy {
				victim.mu.Unlock()
				victim = nil
			} else {
				victim.shut = true
				victim.evicted.Store(true)
				victim.Conn.Close()
				victim.mu.Unlock()
			}
		}
		if victim == nil {
			g.mu.Unlock()
			g.cfg.LimitHit(LimitConns)
			if n, ok := g.dropLog.Allow(now); ok {
				g.log.Warn("too many "+g.cfg.Name+" connections, none idle: closing the new one", "limit", g.cfg.MaxConns, "remote", nc.RemoteAddr().String(), "suppressed", n)
			}
			return nil, true
		}
		// Out of the count now; its goroutine releases it when the close
		// reaches it.
		delete(g.conns, victim)
	}
	c := &Conn{Conn: nc, ID: g.seq.Add(1), Born: now, g: g}
	c.active.Store(now.UnixNano())
	g.conns[c] = struct{}{}
	g.wg.Add(1)
	g.mu.Unlock()
	if victim != nil {
		g.cfg.LimitHit(LimitConns)
		if n, ok := g.evictLog.Allow(now); ok {
			g.log.Warn("too many "+g.cfg.Name+" connections: closed the longest silent one for a new one", "limit", g.cfg.MaxConns,
				"closed", victim.RemoteAddr().String(), "silent_for", idle.Round(time.Millisecond), "suppressed", n)
		}
	}
	return c, true
}

// longestIdle is the connection silent longest, if for MinIdle at least
// and not in a request. Called with mu held, at the cap only.
func (g *Gate) longestIdle(now time.Time) (*Conn, time.Duration) {
	var victim *Conn
	var idle time.Duration
	for c := range g.conns {
		d := now.Sub(time.Unix(0, c.active.Load()))
		if d < g.cfg.MinIdle || d <= idle {
			continue
		}
		c.mu.Lock()
		busy := c.busy
		c.mu.Unlock()
		if !busy {
			victim, idle = c, d
		}
	}
	return victim, idle
}

// Open is the number of open connections.
func (g *Gate) Open() int {
	g.mu.Lock()
	defer g.mu.Unlock()
	return len(g.conns)
}

// Each calls f for every open connection, under the gate's lock.
func (g *Gate) Each(f func(*Conn)) {
	g.mu.Lock()
	defer g.mu.Unlock()
	for c := range g.conns {
		f(c)
	}
}

// Shutting reports whether shutdown began.
func (g *Gate) Shutting() bool { return g.shutting.Load() }

// Dropped counts and logs, rate-limited, a connection closed for reason;
// limit names the limit it hit, or is "" for a broken protocol.
func (g *Gate) Dropped(remote, reason, limit string) {
	if limit != "" {
		g.cfg.LimitHit(limit)
	}
	if g.shutting.Load() {
		return
	}
	if n, ok := g.badLog.Allow(time.Now()); ok {
		g.log.Warn(g.cfg.Name+" connection dropped", "remote", remote, "reason", reason, "limit", limit, "suppressed", n)
	}
}

// Hold waits for a rule's delay; shutdown cuts it short (the answer is
// given anyway: the request came before).
func (g *Gate) Hold(d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-g.stop:
	}
}

// Stopping is closed when delays are to be cut short.
func (g *Gate) Stopping() <-chan struct{} { return g.stop }

func (g *Gate) cutDelays() { g.stopOnce.Do(func() { close(g.stop) }) }

// Shutdown stops accepting and drains (see GateConfig.DrainIdle) until
// ctx ends; then it closes what is left and waits for its release.
func (g *Gate) Shutdown(ctx context.Context) error {
	g.mu.Lock()
	if g.shutting.Swap(true) {
		g.mu.Unlock()
		return nil
	}
	for ln := range g.lns {
		ln.Close()
	}
	if g.cfg.DrainIdle {
		for c := range g.conns {
			c.mu.Lock()
			c.shut = true
			if !c.busy {
				c.Conn.Close()
			}
			c.mu.Unlock()
		}
	}
	g.mu.Unlock()
	if g.cfg.DrainIdle {
		g.cutDelays()
	}
	done := make(chan struct{})
	go func() { g.wg.Wait(); close(done) }()
	select {
	case <-done:
		g.cutDelays()
		return nil
	case <-ctx.Done():
	}
	g.cutDelays()
	g.mu.Lock()
	for c := range g.conns {
		c.Conn.Close()
	}
	g.mu.Unlock()
	<-done
	return ctx.Err()
}
