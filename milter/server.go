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
	"cmp"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"sync"
	"sync/atomic"
	"time"

	gomilter "github.com/emersion/go-milter"

	"github.com/policyd-mail/policyd/internal/listen"
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
	// MaxConns bounds open connections; at the cap, one silent for
	// MinIdle or longer is closed for a new one (listen.Gate).
	MaxConns int
	MinIdle  time.Duration
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
	c.IdleTimeout = cmp.Or(c.IdleTimeout, DefaultIdleTimeout)
	c.WriteTimeout = cmp.Or(c.WriteTimeout, 30*time.Second)
	c.MaxConnTime = cmp.Or(c.MaxConnTime, DefaultMaxConnTime)
	c.MaxCommandDelay = cmp.Or(c.MaxCommandDelay, 25*time.Second)
	c.MaxContentDelay = cmp.Or(c.MaxContentDelay, 250*time.Second)
	c.LogEvery = cmp.Or(c.LogEvery, time.Second)
	c.MaxConns = cmp.Or(c.MaxConns, DefaultMaxConns)
	c.MaxPacket = cmp.Or(c.MaxPacket, DefaultMaxPacket)
	c.MaxMacros = cmp.Or(c.MaxMacros, DefaultMaxMacros)
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

// Server serves milter connections.
type Server struct {
	cfg   Config
	chain func() *rules.Chain
	log   *slog.Logger
	gate  *listen.Gate
}

// New makes a server; chain returns the chain new sessions start on.
func New(cfg Config, chain func() *rules.Chain) *Server {
	cfg.defaults()
	log := cfg.Logger.With("protocol", "milter")
	return &Server{
		cfg:   cfg,
		chain: chain,
		log:   log,
		// One connection is one SMTP session: shutdown waits for the
		// MTA to end each.
		gate: listen.NewGate(listen.GateConfig{
			Name: "milter", MaxConns: cfg.MaxConns, MinIdle: cfg.MinIdle,
			LimitHit: cfg.LimitHit, LogEvery: cfg.LogEvery, Logger: log,
		}),
	}
}

// Serve accepts milter connections on ln until Shutdown.
func (s *Server) Serve(ln net.Listener) error {
	if !s.gate.Listen(ln) {
		return net.ErrClosed
	}
	l := &listener{Listener: ln, srv: s}
	gs := &gomilter.Server{
		NewMilter: l.newSession,
		// Only the envelope and the end of the message matter to the
		// rules: no body chunks, no header lines.
		Protocol: gomilter.OptNoBody | gomilter.OptNoHeaders,
	}
	err := gs.Serve(l)
	if s.gate.Shutting() || errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// listener hands go-milter the connections the gate admits, wrapped so
// they carry deadlines and report their closing.
type listener struct {
	net.Listener
	srv  *Server
	last *conn // the conn just accepted, for the NewMilter call that follows
}

// Accept admits a connection. go-milter calls NewMilter right after
// Accept in the same goroutine, so last is handed over there.
func (l *listener) Accept() (net.Conn, error) {
	gc, err := l.srv.gate.Accept(l.Listener)
	if err != nil {
		return nil, err
	}
	c := &conn{Conn: gc, srv: l.srv}
	gc.Owner = c
	l.last = c
	return c, nil
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

// conn is one MTA connection: deadlines on every read and write, whole
// checked packets only (guard.go), and the session's end hooks when it
// closes, whoever closes it.
type conn struct {
	*listen.Conn
	srv     *Server
	sess    atomic.Pointer[session]
	ended   sync.Once
	pending []byte // the rest of the checked packet go-milter is reading
	buf     []byte // reused for small packets
	// br batches reads: an MTA writes a command's macro packet and the
	// command together, and a read per packet header and body was a
	// quarter of the daemon's time under load.
	br *bufio.Reader
	// mailSize is the SIZE= parameter of the last MAIL packet (0 without
	// one): go-milter passes MailFrom the address only.
	mailSize atomic.Int64
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
	if c.Evicted() {
		return // the gate closed it, and said so
	}
	s.gate.Dropped(c.RemoteAddr().String(), err.reason, err.limit)
}

func (c *conn) Write(p []byte) (int, error) {
	_ = c.Conn.SetWriteDeadline(time.Now().Add(c.srv.cfg.WriteTimeout))
	n, err := c.Conn.Write(p)
	// The reply is out. A session inside a transaction stays busy: with
	// headers and body negotiated off, the MTA is silent while its client
	// sends the message, and the session is not idle for that.
	m := c.sess.Load()
	c.SetBusy(m != nil && m.inTransaction())
	return n, err
}

func (c *conn) Close() error {
	err := c.Conn.Conn.Close()
	c.ended.Do(func() {
		if m := c.sess.Load(); m != nil {
			m.end()
		}
	})
	c.Release()
	return err
}

// Open is the number of open milter connections (SMTP sessions).
func (s *Server) Open() int { return s.gate.Open() }

// Shutdown stops accepting and waits for open sessions to end (the MTA
// closes each at the end of its SMTP session) until ctx ends; then it
// closes the rest, and the MTA applies its milter_default_action.
func (s *Server) Shutdown(ctx context.Context) error { return s.gate.Shutdown(ctx) }
