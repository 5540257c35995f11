package postfixpolicy

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/policyd-mail/policyd/internal/ratelog"
	"github.com/policyd-mail/policyd/rules"
)

// Defaults of Config, also the daemon's flag defaults.
const (
	// Postfix closes its own side after smtpd_policy_service_max_idle
	// (300s), so ours is a little longer.
	DefaultIdleTimeout = 330 * time.Second
	// Postfix closes a policy connection after smtpd_policy_service_max_ttl
	// (1000s); an hour leaves room for an operator who raised it, and
	// still frees a slot held by a client that never lets go.
	DefaultMaxConnTime = time.Hour
	DefaultMaxConns    = 1000
	// Sessions are tracked between requests: one per SMTP client
	// connection Postfix has open, far below this on any one MTA.
	DefaultMaxSessions = 100000
)

// Names of the limits, as counted by Config.LimitHit (the limit label of
// policyd_limit_hits_total).
const (
	LimitLineLength  = "line_length"     // a line longer than Limits.MaxLine
	LimitAttributes  = "attributes"      // more than Limits.MaxAttrs in a request
	LimitRequestSize = "request_size"    // a request larger than Limits.MaxRequest
	LimitIdleTime    = "idle_time"       // no request within IdleTimeout
	LimitRequestTime = "request_time"    // a request not complete within RequestTimeout
	LimitConnTime    = "connection_time" // a connection open longer than MaxConnTime
	LimitConns       = "connections"     // a connection refused over MaxConns
	LimitSessions    = "sessions"        // a session ended early over MaxSessions
)

// LimitNames lists every limit this front-end counts, so a counter can
// show each at zero before the first hit.
var LimitNames = []string{LimitLineLength, LimitAttributes, LimitRequestSize, LimitIdleTime,
	LimitRequestTime, LimitConnTime, LimitConns, LimitSessions}

// Config tunes the server. Zero values take the defaults.
type Config struct {
	Limits Limits
	// IdleTimeout bounds the wait for the next request on a connection.
	IdleTimeout time.Duration
	// RequestTimeout bounds the rest of a request once its first line came.
	RequestTimeout time.Duration
	// WriteTimeout bounds writing a reply.
	WriteTimeout time.Duration
	// MaxConnTime bounds how long one connection is kept; past it, the
	// connection is closed after its current request is answered.
	MaxConnTime time.Duration
	// MaxDelay caps a rule's delay; keep it well under Postfix's
	// smtpd_policy_service_timeout (100s by default, 10s recommended).
	MaxDelay time.Duration
	// MaxConns bounds open connections per listener.
	MaxConns int
	// SessionIdle ends a tracked SMTP session after this long without a
	// request; MaxSessions bounds how many are tracked.
	SessionIdle time.Duration
	MaxSessions int
	// LimitHit, when set, counts a client that hit one of the limits
	// named in LimitNames.
	LimitHit func(limit string)
	// LogEvery bounds the lines about dropped connections, refused
	// connections and sessions ended over MaxSessions: one per LogEvery
	// for each, with the count of those held back; negative logs every one.
	LogEvery time.Duration
	Logger   *slog.Logger
	Clock    rules.Clock
}

func (c *Config) defaults() {
	if c.Limits.MaxLine == 0 {
		c.Limits.MaxLine = DefaultLimits.MaxLine
	}
	if c.Limits.MaxAttrs == 0 {
		c.Limits.MaxAttrs = DefaultLimits.MaxAttrs
	}
	if c.Limits.MaxRequest == 0 {
		c.Limits.MaxRequest = DefaultLimits.MaxRequest
	}
	setDur(&c.IdleTimeout, DefaultIdleTimeout)
	setDur(&c.RequestTimeout, 10*time.Second)
	setDur(&c.WriteTimeout, 10*time.Second)
	setDur(&c.MaxConnTime, DefaultMaxConnTime)
	setDur(&c.MaxDelay, 8*time.Second)
	setDur(&c.SessionIdle, 10*time.Minute)
	setDur(&c.LogEvery, time.Second)
	if c.MaxConns == 0 {
		c.MaxConns = DefaultMaxConns
	}
	if c.MaxSessions == 0 {
		c.MaxSessions = DefaultMaxSessions
	}
	if c.LimitHit == nil {
		c.LimitHit = func(string) {}
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	if c.Clock == nil {
		c.Clock = rules.SystemClock{}
	}
}

func setDur(d *time.Duration, def time.Duration) {
	if *d == 0 {
		*d = def
	}
}

// Server answers Postfix policy requests.
type Server struct {
	cfg     Config
	chain   func() *rules.Chain // the current chain, for new sessions
	tracker *tracker
	log     *slog.Logger

	mu        sync.Mutex
	listeners map[net.Listener]struct{}
	conns     map[*conn]struct{}
	shutting  atomic.Bool
	wg        sync.WaitGroup // connection goroutines
	stop      chan struct{}  // stops the session sweeper
	sweepDone chan struct{}
	connSeq   atomic.Uint64
	dropLog   *ratelog.Limiter // too many connections
	badLog    *ratelog.Limiter // a connection dropped
	sessLog   *ratelog.Limiter // too many sessions
}

// New makes a server. chain returns the chain new sessions start on, so a
// reload is a swap behind that function.
func New(cfg Config, chain func() *rules.Chain) *Server {
	cfg.defaults()
	every := max(cfg.LogEvery, 0)
	s := &Server{
		cfg:       cfg,
		chain:     chain,
		log:       cfg.Logger.With("protocol", "policy"),
		listeners: map[net.Listener]struct{}{},
		conns:     map[*conn]struct{}{},
		stop:      make(chan struct{}),
		sweepDone: make(chan struct{}),
		dropLog:   ratelog.New(every),
		badLog:    ratelog.New(every),
		sessLog:   ratelog.New(every),
	}
	s.tracker = newTracker(cfg.MaxSessions, cfg.SessionIdle, s.endSession)
	s.tracker.overflow = s.sessionsOverflow
	go s.sweep()
	return s
}

// sweep ends idle sessions in the background so their disconnect hooks
// run even when no request comes to trigger the check.
func (s *Server) sweep() {
	defer close(s.sweepDone)
	t := time.NewTicker(s.cfg.SessionIdle / 10)
	defer t.Stop()
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
			s.tracker.expire(s.cfg.Clock.Now())
		}
	}
}

// endSession runs the hooks of a session the policy protocol will never
// report the end of: a transaction reset if one is open, then disconnect.
func (s *Server) endSession(ts *tracked) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if ts.closed {
		return
	}
	ts.closed = true
	defer func() {
		// A panic outside the rules (they have their own recovery) must
		// not stop the sweeper or shutdown.
		if p := recover(); p != nil {
			s.log.Error("ending a policy session panicked", "session", ts.s.ID, "panic", p)
		}
	}()
	ts.s.End(context.Background())
}

// Sessions is the number of SMTP sessions being tracked.
func (s *Server) Sessions() int { return s.tracker.len() }

// Serve accepts connections on ln until Shutdown.
func (s *Server) Serve(ln net.Listener) error {
	s.mu.Lock()
	if s.shutting.Load() {
		s.mu.Unlock()
		return net.ErrClosed
	}
	s.listeners[ln] = struct{}{}
	s.mu.Unlock()
	sem := make(chan struct{}, s.cfg.MaxConns)
	var backoff time.Duration
	for {
		nc, err := ln.Accept()
		if err != nil {
			if s.shutting.Load() || errors.Is(err, net.ErrClosed) {
				return nil
			}
			// Out of descriptors and the like: wait and go on, as
			// net/http does, rather than stop serving.
			s.log.Error("policy accept failed", "err", err)
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			time.Sleep(backoff)
			continue
		}
		backoff = 0
		select {
		case sem <- struct{}{}:
		default:
			s.cfg.LimitHit(LimitConns)
			if n, ok := s.dropLog.Allow(time.Now()); ok {
				s.log.Warn("too many policy connections, closing new one", "limit", s.cfg.MaxConns, "remote", nc.RemoteAddr().String(), "suppressed", n)
			}
			nc.Close()
			continue
		}
		c := &conn{nc: nc, id: s.connSeq.Add(1)}
		s.mu.Lock()
		if s.shutting.Load() {
			s.mu.Unlock()
			nc.Close()
			<-sem
			return nil
		}
		s.conns[c] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer func() { <-sem }()
			s.serveConn(c)
		}()
	}
}

// conn is one Postfix connection; busy is set while a request is being
// answered, so shutdown closes idle connections at once and lets busy
// ones finish their request.
type conn struct {
	nc   net.Conn
	id   uint64
	mu   sync.Mutex
	busy bool
	shut bool
}

func (c *conn) setBusy(b bool) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.busy = b
	return !c.shut
}

func (s *Server) serveConn(c *conn) {
	defer func() {
		if p := recover(); p != nil {
			s.log.Error("policy connection panicked", "remote", c.nc.RemoteAddr().String(), "panic", p)
		}
		c.nc.Close()
		s.mu.Lock()
		delete(s.conns, c)
		s.mu.Unlock()
		s.wg.Done()
	}()
	remote := c.nc.RemoteAddr().String()
	born := time.Now()
	inRequest := false
	rd := newReader(c.nc, s.cfg.Limits, func() {
		inRequest = true
		c.setBusy(true)
		s.log.Debug("policy request started", "remote", remote)
		_ = c.nc.SetReadDeadline(time.Now().Add(s.cfg.RequestTimeout))
	})
	bw := bufio.NewWriterSize(c.nc, 512)
	var req Request
	// Each smtpd process has its own policy connection and serves one SMTP
	// session at a time: when a request of another session comes on this
	// connection, the previous session is over. Ending it then, rather
	// than after SessionIdle, keeps the tracked sessions near the number
	// of smtpd processes instead of the sessions of the last minutes.
	// A connection that closes leaves its last session to the idle
	// expiry: it may close in the middle of one, and smtpd reconnects.
	var last sessionKey
	for {
		inRequest = false
		wait := s.waitDeadline(c.nc, born)
		err := rd.read(&req)
		if err != nil {
			if !errors.Is(err, io.EOF) && !s.shutting.Load() {
				if inRequest {
					wait = LimitRequestTime
				}
				s.dropped(remote, err, wait)
			}
			return
		}
		tg, ok := targetOf(&req, c.id)
		if ok && tg.key != last {
			if last != (sessionKey{}) {
				s.tracker.end(last)
			}
			last = tg.key
		}
		act, delay := s.answerFor(&req, tg, ok)
		if delay > 0 {
			if !s.hold(delay) {
				return
			}
		}
		_ = c.nc.SetWriteDeadline(time.Now().Add(s.cfg.WriteTimeout))
		bw.WriteString("action=")
		bw.WriteString(act)
		bw.WriteString("\n\n")
		if err := bw.Flush(); err != nil {
			s.log.Warn("policy reply not written", "remote", remote, "err", err)
			return
		}
		if !c.setBusy(false) {
			return
		}
		if time.Since(born) >= s.cfg.MaxConnTime {
			// Between requests, so Postfix only reconnects for the next one.
			s.dropped(remote, os.ErrDeadlineExceeded, LimitConnTime)
			return
		}
	}
}

// waitDeadline sets the deadline for the next request, the nearer of the
// idle timeout and the end of the connection's allowed lifetime, and
// says which limit it is.
func (s *Server) waitDeadline(nc net.Conn, born time.Time) string {
	d, limit := time.Now().Add(s.cfg.IdleTimeout), LimitIdleTime
	if end := born.Add(s.cfg.MaxConnTime); end.Before(d) {
		d, limit = end, LimitConnTime
	}
	_ = nc.SetReadDeadline(d)
	return limit
}

// dropped counts and logs a connection closed for err; timeout names the
// limit a deadline stood for.
func (s *Server) dropped(remote string, err error, timeout string) {
	limit, reason := "", err.Error()
	switch {
	case errors.Is(err, ErrLineTooLong):
		limit = LimitLineLength
	case errors.Is(err, ErrTooManyAttrs):
		limit = LimitAttributes
	case errors.Is(err, ErrRequestTooBig):
		limit = LimitRequestSize
	case errors.Is(err, os.ErrDeadlineExceeded):
		limit = timeout
		switch timeout {
		case LimitConnTime:
			reason = "connection open for longer than " + s.cfg.MaxConnTime.String()
		case LimitRequestTime:
			reason = "request not complete within " + s.cfg.RequestTimeout.String()
		default:
			reason = "no request within " + s.cfg.IdleTimeout.String()
		}
	}
	if limit != "" {
		s.cfg.LimitHit(limit)
	}
	if n, ok := s.badLog.Allow(time.Now()); ok {
		s.log.Warn("policy connection dropped", "remote", remote, "reason", reason, "limit", limit, "suppressed", n)
	}
}

// sessionsOverflow counts and logs sessions the tracker ended early to
// stay within MaxSessions.
func (s *Server) sessionsOverflow(n int) {
	for range n {
		s.cfg.LimitHit(LimitSessions)
	}
	if held, ok := s.sessLog.Allow(time.Now()); ok {
		s.log.Warn("too many policy sessions tracked, ending the least recently used", "limit", s.cfg.MaxSessions, "ended", n, "suppressed", held)
	}
}

// hold waits for a rule's delay, cut short by shutdown.
func (s *Server) hold(d time.Duration) bool {
	t := time.NewTimer(min(d, s.cfg.MaxDelay))
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-s.stop:
		return true // answer anyway: the request was accepted before shutdown
	}
}

// answer turns one request into its action and delay.
// target is what a request is about: its SMTP session and stage.
type target struct {
	key  sessionKey
	addr netip.Addr
	st   stage
}

// targetOf reads req's session and stage; false for a request answered
// DUNNO without a session (answerFor says why).
func targetOf(req *Request, connID uint64) (target, bool) {
	st, ok := stageOf(req.ProtocolState)
	if !ok || req.Request != "smtpd_access_policy" {
		return target{}, false
	}
	addr, err := netip.ParseAddr(req.ClientAddress)
	if err != nil {
		return target{}, false
	}
	key := sessionKey{client: req.ClientAddress, port: req.ClientPort, server: req.ServerAddress, sport: req.ServerPort}
	if key.port == "" {
		// Postfix before 3.0 sends no client_port: one connection then
		// stands for one smtpd process, which serves one session at a time.
		key.port = "conn-" + strconv.FormatUint(connID, 10)
	}
	return target{key: key, addr: addr, st: st}, true
}

func (s *Server) answerFor(req *Request, tg target, ok bool) (string, time.Duration) {
	if !ok {
		switch _, known := stageOf(req.ProtocolState); {
		case !known:
			s.log.Warn("unknown protocol_state, answering DUNNO", "protocol_state", req.ProtocolState, "client", req.ClientAddress)
		case req.Request != "smtpd_access_policy":
			s.log.Warn("not an smtpd_access_policy request, answering DUNNO", "request", req.Request)
		default:
			s.log.Warn("request without a usable client_address, answering DUNNO", "client_address", req.ClientAddress)
		}
		return "DUNNO", 0
	}
	for {
		ts := s.tracker.get(tg.key, s.cfg.Clock.Now(), func() *rules.Conversation { return s.newSession(tg.key, req, tg.addr) })
		o, ok := s.answerLocked(ts, tg.key, req, tg.addr, tg.st)
		if ok {
			return action(o.d), o.delay
		}
		// Evicted between lookup and lock: start afresh.
	}
}

func (s *Server) newSession(key sessionKey, req *Request, addr netip.Addr) *rules.Conversation {
	port, _ := strconv.Atoi(req.ClientPort)
	sess := rules.NewConversation(s.chain(), "policy", addr, port, s.cfg.Clock.Now())
	sess.ID = key.client + ":" + key.port
	return sess
}

// answerLocked replays req on ts under its lock; the deferred unlock
// keeps a panic from leaving the session locked for good.
func (s *Server) answerLocked(ts *tracked, key sessionKey, req *Request, addr netip.Addr, st stage) (outcome, bool) {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if ts.closed {
		return outcome{}, false
	}
	ctx := context.Background()
	if ts.startsNewSession(req) {
		ts.s.End(ctx)
		ts.restart(s.newSession(key, req, addr))
	}
	fillSession(ts.s, req)
	return replay(ctx, ts, req, st), true
}

func fillSession(sess *rules.Conversation, req *Request) {
	if req.ClientName != "" {
		sess.ClientName = req.ClientName
	}
	if req.SASLUsername != "" {
		sess.AuthUser = req.SASLUsername
	}
}

// Shutdown stops accepting, closes idle connections, lets requests in
// progress finish (until ctx ends), then ends tracked sessions.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	if s.shutting.Swap(true) {
		s.mu.Unlock()
		return nil
	}
	for ln := range s.listeners {
		ln.Close()
	}
	for c := range s.conns {
		c.mu.Lock()
		c.shut = true
		if !c.busy {
			c.nc.Close()
		}
		c.mu.Unlock()
	}
	s.mu.Unlock()
	close(s.stop)
	<-s.sweepDone
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	var err error
	select {
	case <-done:
	case <-ctx.Done():
		err = ctx.Err()
		s.mu.Lock()
		for c := range s.conns {
			c.nc.Close()
		}
		s.mu.Unlock()
		<-done
	}
	if n := s.tracker.drain(ctx); n > 0 {
		s.log.Warn("shutdown deadline: sessions ended without their disconnect hooks", "sessions", n)
	}
	return err
}
