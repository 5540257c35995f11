// Package milter is the milter front-end for Postfix (smtpd_milters) and
// Sendmail (INPUT_MAIL_FILTER): one milter connection is one SMTP session,
// its callbacks become hooks, and the chain's decision goes back as an
// explicit SMTP reply. It makes no policy choices.
//
// go-milter v0.5 speaks protocol v2 and has gaps this package fills: it
// replaces a connection's handler after a plain reject (we always answer
// with reply codes), keeps only the last stage's macros (we merge them),
// has no disconnect callback, no deadlines and no drain (we wrap the
// listener and its connections).
package milter

import (
	"bufio"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	gomilter "github.com/emersion/go-milter"

	"github.com/policyd-mail/policyd/internal/ratelog"
	"github.com/policyd-mail/policyd/rules"
)

// Defaults of Config, also the daemon's flag defaults.
const (
	// Between SMTP commands the client may think for smtpd_timeout
	// (300s), so the MTA may be silent that long: ours is a little longer.
	DefaultIdleTimeout = 330 * time.Second
	// One milter connection lasts one SMTP session, which Postfix and
	// Sendmail bound only per command; a day is beyond any real one
	// (a maximum-size message at a crawl) and still frees a slot held
	// by a peer that trickles packets forever.
	DefaultMaxConnTime = 24 * time.Hour
	DefaultMaxConns    = 1000
	// policyd asks for no body and no header lines, so what an MTA sends
	// is small.
	DefaultMaxPacket = 64 << 10
	// Postfix sends a handful of macros per stage (milter_*_macros),
	// Sendmail a few dozen at most.
	DefaultMaxMacros = 256
)

// Config tunes the server. Zero values take the defaults.
type Config struct {
	// IdleTimeout bounds the wait for the MTA's next packet.
	IdleTimeout  time.Duration
	WriteTimeout time.Duration
	// MaxConnTime bounds how long one connection may stay open.
	MaxConnTime time.Duration
	// MaxCommandDelay and MaxContentDelay cap a rule's delay so the
	// reply comes within Postfix's milter_command_timeout (30s) and
	// milter_content_timeout (300s).
	MaxCommandDelay time.Duration
	MaxContentDelay time.Duration
	MaxConns        int
	// MaxPacket bounds one milter packet, MaxMacros the macros in one.
	MaxPacket uint32
	MaxMacros int
	// LimitHit, when set, counts a client that hit one of the limits
	// named in LimitNames.
	LimitHit func(limit string)
	// LogEvery bounds the lines about refused and dropped connections
	// to one of each per LogEvery, with the count of those held back;
	// negative logs every one.
	LogEvery time.Duration
	Logger   *slog.Logger
	Clock    rules.Clock
}

func (c *Config) defaults() {
	setDur(&c.IdleTimeout, DefaultIdleTimeout)
	setDur(&c.WriteTimeout, 30*time.Second)
	setDur(&c.MaxConnTime, DefaultMaxConnTime)
	setDur(&c.MaxCommandDelay, 25*time.Second)
	setDur(&c.MaxContentDelay, 250*time.Second)
	setDur(&c.LogEvery, time.Second)
	if c.MaxConns == 0 {
		c.MaxConns = DefaultMaxConns
	}
	if c.MaxPacket == 0 {
		c.MaxPacket = DefaultMaxPacket
	}
	if c.MaxMacros == 0 {
		c.MaxMacros = DefaultMaxMacros
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

// Server serves milter connections.
type Server struct {
	cfg   Config
	chain func() *rules.Chain
	log   *slog.Logger

	mu       sync.Mutex
	conns    map[*conn]struct{}
	lns      map[*listener]struct{}
	shutting atomic.Bool
	wg       sync.WaitGroup // open connections
	stop     chan struct{}
	connSeq  atomic.Uint64
	dropLog  *ratelog.Limiter // too many connections
	badLog   *ratelog.Limiter // a connection dropped
}

// New makes a server; chain returns the chain new sessions start on.
func New(cfg Config, chain func() *rules.Chain) *Server {
	cfg.defaults()
	every := max(cfg.LogEvery, 0)
	return &Server{
		cfg:     cfg,
		chain:   chain,
		log:     cfg.Logger.With("protocol", "milter"),
		conns:   map[*conn]struct{}{},
		lns:     map[*listener]struct{}{},
		stop:    make(chan struct{}),
		dropLog: ratelog.New(every),
		badLog:  ratelog.New(every),
	}
}

// Serve accepts milter connections on ln until Shutdown.
func (s *Server) Serve(ln net.Listener) error {
	l := &listener{Listener: ln, srv: s, sem: make(chan struct{}, s.cfg.MaxConns)}
	s.mu.Lock()
	if s.shutting.Load() {
		s.mu.Unlock()
		return net.ErrClosed
	}
	s.lns[l] = struct{}{}
	s.mu.Unlock()
	gs := &gomilter.Server{
		NewMilter: l.newSession,
		// Only the envelope and the end of the message matter to the
		// rules: no body chunks, no header lines.
		Protocol: gomilter.OptNoBody | gomilter.OptNoHeaders,
	}
	err := gs.Serve(l)
	if s.shutting.Load() || errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// listener hands go-milter connections that are bounded in number, carry
// deadlines and report their closing.
type listener struct {
	net.Listener
	srv  *Server
	sem  chan struct{}
	last *conn // the conn just accepted, for the NewMilter call that follows
}

// Accept admits a connection within the limit. go-milter calls NewMilter
// right after Accept in the same goroutine, so last is handed over there.
func (l *listener) Accept() (net.Conn, error) {
	var backoff time.Duration
	for {
		nc, err := l.Listener.Accept()
		if err != nil {
			if l.srv.shutting.Load() || errors.Is(err, net.ErrClosed) {
				return nil, net.ErrClosed
			}
			l.srv.log.Error("milter accept failed", "err", err)
			backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
			time.Sleep(backoff)
			continue
		}
		select {
		case l.sem <- struct{}{}:
		default:
			l.srv.cfg.LimitHit(LimitConns)
			if n, ok := l.srv.dropLog.Allow(time.Now()); ok {
				l.srv.log.Warn("too many milter connections, closing new one", "limit", l.srv.cfg.MaxConns, "remote", nc.RemoteAddr().String(), "suppressed", n)
			}
			nc.Close()
			continue
		}
		c := &conn{Conn: nc, srv: l.srv, id: l.srv.connSeq.Add(1), born: time.Now(), release: func() { <-l.sem }}
		if !l.srv.track(c) {
			nc.Close()
			<-l.sem
			return nil, net.ErrClosed
		}
		l.last = c
		return c, nil
	}
}

// newSession is go-milter's NewMilter. It is also called if go-milter
// ever replaces a handler (we never give it cause); such a handler has no
// connection and passes everything.
func (l *listener) newSession() gomilter.Milter {
	c := l.last
	l.last = nil
	if c == nil {
		l.srv.log.Error("go-milter replaced a session handler; the rest of that session is not checked")
		return noSession{}
	}
	m := &session{srv: l.srv, conn: c, macros: make(map[string]string, 16)}
	c.sess.Store(m)
	return m
}

// noSession answers continue to everything.
type noSession struct{ gomilter.NoOpMilter }

func (noSession) Body(*gomilter.Modifier) (gomilter.Response, error) {
	return gomilter.RespContinue, nil
}

func (s *Server) track(c *conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.shutting.Load() {
		return false
	}
	s.conns[c] = struct{}{}
	s.wg.Add(1)
	return true
}

// conn is one MTA connection: deadlines on every read and write, whole
// checked packets only (guard.go), and the session's end hooks when it
// closes, whoever closes it.
type conn struct {
	net.Conn
	srv     *Server
	id      uint64
	born    time.Time
	sess    atomic.Pointer[session]
	release func()
	once    sync.Once
	pending []byte // the rest of the checked packet go-milter is reading
	buf     []byte // reused for small packets
	// br batches reads: an MTA writes a command's macro packet and the
	// command together, and a read per packet header and body was a
	// quarter of the daemon's time under load.
	br *bufio.Reader
}

// Read hands go-milter the next checked packet. A broken or hostile
// stream reads as a clean end: go-milter then closes the connection
// without a log line of its own, and ours is counted and rate-limited.
func (c *conn) Read(p []byte) (int, error) {
	if len(c.pending) == 0 {
		pkt, err := c.next()
		if err != nil {
			var de *dropError
			if errors.As(err, &de) {
				c.srv.dropped(c, de)
			}
			return 0, io.EOF
		}
		c.pending = pkt
	}
	n := copy(p, c.pending)
	c.pending = c.pending[n:]
	return n, nil
}

// dropped counts and logs a connection dropped for err.
func (s *Server) dropped(c *conn, err *dropError) {
	if err.limit != "" {
		s.cfg.LimitHit(err.limit)
	}
	if s.shutting.Load() {
		return
	}
	if n, ok := s.badLog.Allow(time.Now()); ok {
		s.log.Warn("milter connection dropped", "remote", c.RemoteAddr().String(), "reason", err.reason, "limit", err.limit, "suppressed", n)
	}
}

func (c *conn) Write(p []byte) (int, error) {
	_ = c.Conn.SetWriteDeadline(time.Now().Add(c.srv.cfg.WriteTimeout))
	return c.Conn.Write(p)
}

func (c *conn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		if m := c.sess.Load(); m != nil {
			m.end()
		}
		c.srv.mu.Lock()
		delete(c.srv.conns, c)
		c.srv.mu.Unlock()
		c.release()
		c.srv.wg.Done()
	})
	return err
}

// Open is the number of open milter connections (SMTP sessions).
func (s *Server) Open() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// Shutdown stops accepting and waits for open sessions to end (the MTA
// closes each at the end of its SMTP session) until ctx ends; then it
// closes the rest, and the MTA applies its milter_default_action.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	if s.shutting.Swap(true) {
		s.mu.Unlock()
		return nil
	}
	for l := range s.lns {
		l.Listener.Close()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
		close(s.stop)
		return nil
	case <-ctx.Done():
	}
	close(s.stop) // cut rule delays short
	s.mu.Lock()
	for c := range s.conns {
		c.Conn.Close() // go-milter's goroutine then calls our Close
	}
	s.mu.Unlock()
	<-done
	return ctx.Err()
}
