package postfixpolicy

import (
	"bufio"
	"cmp"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"strconv"
	"sync"
	"time"

	"github.com/policyd-mail/policyd/internal/listen"
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
	// Sessions are tracked between requests: about one per smtpd process
	// (Postfix's default_process_limit is 100), plus those of processes
	// gone until they idle out. One costs ~1.1 KB of heap, ~2.2 KB with
	// the collector's headroom (memory_test.go): 20 000 are ~45 MB.
	DefaultMaxSessions = 20000
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
	LimitConns       = listen.LimitConns // a connection refused or closed at MaxConns
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
	// MaxConns bounds open connections; at the cap, one silent for
	// MinIdle or longer is closed for a new one (listen.Gate).
	MaxConns int
	MinIdle  time.Duration
	// SessionIdle ends a tracked SMTP session after this long without a
	// request; MaxSessions bounds how many are tracked.
	SessionIdle time.Duration
	MaxSessions int
	// WiringCheckAfter is how many RCPT requests without any at DATA or
	// END-OF-MESSAGE make the server warn, when rules answer there.
	WiringCheckAfter int
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
	c.Limits.MaxLine = cmp.Or(c.Limits.MaxLine, DefaultLimits.MaxLine)
	c.Limits.MaxAttrs = cmp.Or(c.Limits.MaxAttrs, DefaultLimits.MaxAttrs)
	c.Limits.MaxRequest = cmp.Or(c.Limits.MaxRequest, DefaultLimits.MaxRequest)
	c.IdleTimeout = cmp.Or(c.IdleTimeout, DefaultIdleTimeout)
	c.RequestTimeout = cmp.Or(c.RequestTimeout, 10*time.Second)
	c.WriteTimeout = cmp.Or(c.WriteTimeout, 10*time.Second)
	c.MaxConnTime = cmp.Or(c.MaxConnTime, DefaultMaxConnTime)
	c.MaxDelay = cmp.Or(c.MaxDelay, 8*time.Second)
	c.SessionIdle = cmp.Or(c.SessionIdle, 10*time.Minute)
	c.LogEvery = cmp.Or(c.LogEvery, time.Second)
	c.MaxConns = cmp.Or(c.MaxConns, DefaultMaxConns)
	c.MaxSessions = cmp.Or(c.MaxSessions, DefaultMaxSessions)
	c.WiringCheckAfter = cmp.Or(c.WiringCheckAfter, wiringCheckAfter)
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

// Server answers Postfix policy requests.
type Server struct {
	cfg     Config
	chain   func() *rules.Chain // the current chain, for new sessions
	tracker *tracker
	log     *slog.Logger
	gate    *listen.Gate

	stopOnce  sync.Once
	stop      chan struct{} // stops the session sweeper
	sweepDone chan struct{}
	sessLog   *ratelog.Limiter // too many sessions
	wiring    wiring
}

// New makes a server. chain returns the chain new sessions start on, so a
// reload is a swap behind that function.
func New(cfg Config, chain func() *rules.Chain) *Server {
	cfg.defaults()
	every := max(cfg.LogEvery, 0)
	s := &Server{
		cfg:   cfg,
		chain: chain,
		log:   cfg.Logger.With("protocol", "policy"),
		gate: listen.NewGate(listen.GateConfig{
			Name: "policy", MaxConns: cfg.MaxConns, MinIdle: cfg.MinIdle, DrainIdle: true,
			LimitHit: cfg.LimitHit, LogEvery: cfg.LogEvery, Logger: cfg.Logger.With("protocol", "policy"),
		}),
		stop:      make(chan struct{}),
		sweepDone: make(chan struct{}),
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
	s.noteSessionEnd(ts.sawRcpt)
	ts.s.End(context.Background())
}

// Sessions is the number of SMTP sessions being tracked.
func (s *Server) Sessions() int { return s.tracker.len() }

// Serve accepts connections on ln until Shutdown.
func (s *Server) Serve(ln net.Listener) error {
	if !s.gate.Listen(ln) {
		return net.ErrClosed
	}
	for {
		c, err := s.gate.Accept(ln)
		if err != nil {
			return nil // closed: by Shutdown, or by whoever owns ln
		}
		go s.serveConn(c)
	}
}

func (s *Server) serveConn(c *listen.Conn) {
	defer func() {
		if p := recover(); p != nil {
			s.log.Error("policy connection panicked", "remote", c.RemoteAddr().String(), "panic", p)
		}
		c.Release()
	}()
	remote := c.RemoteAddr().String()
	born := c.Born
	inRequest := false
	// Asked once a connection: the call's arguments would otherwise be
	// built for every request at any level.
	debug := s.log.Enabled(context.Background(), slog.LevelDebug)
	rd := newReader(c, s.cfg.Limits, func() {
		inRequest = true
		c.SetBusy(true)
		if debug {
			s.log.Debug("policy request started", "remote", remote)
		}
		_ = c.SetReadDeadline(time.Now().Add(s.cfg.RequestTimeout))
	})
	bw := bufio.NewWriterSize(c, 512)
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
		wait := s.waitDeadline(c, born)
		err := rd.read(&req)
		if err != nil {
			if !errors.Is(err, io.EOF) && !s.gate.Shutting() && !c.Evicted() {
				if inRequest {
					wait = LimitRequestTime
				}
				s.dropped(remote, err, wait)
			}
			return
		}
		tg, ok := targetOf(&req, c.ID)
		if ok && tg.key != last {
			if last != (sessionKey{}) {
				s.tracker.end(last)
			}
			last = tg.key
		}
		act, delay := s.answerFor(&req, tg, ok)
		if delay > 0 {
			s.gate.Hold(min(delay, s.cfg.MaxDelay))
		}
		_ = c.SetWriteDeadline(time.Now().Add(s.cfg.WriteTimeout))
		bw.WriteString("action=")
		bw.WriteString(act)
		bw.WriteString("\n\n")
		if err := bw.Flush(); err != nil {
			s.log.Warn("policy reply not written", "remote", remote, "err", err)
			return
		}
		if !c.SetBusy(false) {
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
	s.gate.Dropped(remote, reason, limit)
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

// target is what a request is about: its SMTP session and stage.
type target struct {
	key  sessionKey
	addr netip.Addr
	st   stage
}

// StateDisconnect is policyd's extension of the protocol: a request with
// protocol_state=DISCONNECT says the SMTP session is over. Postfix never
// sends it (its policy connection carries the next session, which tells);
// an MTA that opens a connection per request, as Exim's ${readsocket}
// does, sends it from its QUIT and not-QUIT ACLs, so the session's
// disconnect hooks run then and tracked sessions stay few. It is answered
// DUNNO.
const StateDisconnect = "DISCONNECT"

// targetOf reads req's session and stage; false for a request answered
// DUNNO without a session (answerFor says why).
func targetOf(req *Request, connID uint64) (target, bool) {
	st, ok := stageOf(req.ProtocolState)
	if req.ProtocolState == StateDisconnect {
		ok, st = true, stageEnd
	}
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
		_, known := stageOf(req.ProtocolState)
		switch {
		case !known && req.ProtocolState != StateDisconnect:
			s.log.Warn("unknown protocol_state, answering DUNNO", "protocol_state", req.ProtocolState, "client", req.ClientAddress)
		case req.Request != "smtpd_access_policy":
			s.log.Warn("not an smtpd_access_policy request, answering DUNNO", "request", req.Request)
		default:
			s.log.Warn("request without a usable client_address, answering DUNNO", "client_address", req.ClientAddress)
		}
		return "DUNNO", 0
	}
	if tg.st == stageEnd {
		s.tracker.end(tg.key)
		return "DUNNO", 0
	}
	s.noteStage(tg.st)
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
		s.noteSessionEnd(ts.sawRcpt)
		ts.s.End(ctx)
		ts.restart(s.newSession(key, req, addr))
	}
	if st == stageRcpt {
		ts.sawRcpt = true
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
	if !sess.Local.IsValid() && req.ServerAddress != "" {
		if a, err := netip.ParseAddr(req.ServerAddress); err == nil {
			sess.Local = a.Unmap()
		}
	}
}

// Shutdown stops accepting, closes idle connections, lets requests in
// progress finish (until ctx ends), then ends tracked sessions.
func (s *Server) Shutdown(ctx context.Context) error {
	s.stopOnce.Do(func() {
		close(s.stop)
		<-s.sweepDone
	})
	err := s.gate.Shutdown(ctx)
	if n := s.tracker.drain(ctx); n > 0 {
		s.log.Warn("shutdown deadline: sessions ended without their disconnect hooks", "sessions", n)
	}
	return err
}
