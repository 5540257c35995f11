// Package redis is the store.Store on Redis, for several policyd hosts
// sharing their counters: a single server, a Sentinel-managed master, or
// a Cluster, through one go-redis UniversalClient.
//
// Every operation is one round trip: one command, or one Lua script run
// with EVALSHA. Every call is bounded by Options.Timeout and never retried
// (a counter retried after a lost reply would count twice). A circuit
// breaker answers store.ErrUnavailable at once while Redis is down and
// probes it in the background, so a dead Redis costs the mail path
// nothing but the engine's fail-open or tempfail answer. See README.md.
package redis

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/policyd-mail/policyd/internal/ratelog"
	"github.com/policyd-mail/policyd/store"
)

// Options configures Open. The zero value is ready to use.
type Options struct {
	// Timeout bounds every call (--store-timeout): a call answers within
	// it or fails with store.ErrUnavailable. Default 100ms.
	Timeout time.Duration
	// DialTimeout bounds a new connection and the start-up and probe
	// checks. Default 1s. A call still never waits past Timeout.
	DialTimeout time.Duration
	// Failures is how many consecutive failed calls open the circuit
	// breaker. Default 3.
	Failures int
	// ProbeInterval is how often an open breaker probes Redis. Default
	// 250ms.
	ProbeInterval time.Duration
	// LogEvery bounds failure log lines to one per interval. Default 10s.
	LogEvery time.Duration
	// TLSConfig is used by the rediss schemes; nil means the system roots
	// and the host name from the URL.
	TLSConfig *tls.Config
	// PoolSize is the number of connections per server; 0 means go-redis's
	// default (10 per CPU).
	PoolSize int
	// Batch coalesces the mail path's commands of concurrent sessions into
	// shared pipelines (go-redis's autopipelining): one write and one read
	// carry many sessions' commands, instead of one of each per command.
	// A queued command no longer heeds its context: its batch is bounded
	// by the client's read and write timeouts (Timeout), so a call waits
	// for at most the batch before it and its own.
	Batch bool
	// MigrateKeys runs MigrateKeys once in the background when Redis
	// answers at Open (the daemon sets it; tests that count commands do not).
	MigrateKeys bool
	// Logger receives the breaker's transitions and, at a bounded rate,
	// failures. nil discards.
	Logger *slog.Logger
}

// DefaultTimeout bounds every call unless Options.Timeout says otherwise;
// it is also --store-timeout's default.
const DefaultTimeout = 100 * time.Millisecond

func (o *Options) defaults() {
	if o.Timeout <= 0 {
		o.Timeout = DefaultTimeout
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = time.Second
	}
	if o.Failures <= 0 {
		o.Failures = 3
	}
	if o.ProbeInterval <= 0 {
		o.ProbeInterval = 250 * time.Millisecond
	}
	if o.LogEvery <= 0 {
		o.LogEvery = 10 * time.Second
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
}

// Store is the Redis backend. It is safe for concurrent use.
type Store struct {
	c goredis.UniversalClient
	// mail runs the mail path's commands: c, or with Options.Batch the
	// autopipeliner over it (ap).
	mail   goredis.Cmdable
	ap     *goredis.AutoPipeliner
	cc     *goredis.ClusterClient // the same client when on a Cluster, else nil
	target Target
	opt    Options
	log    *slog.Logger
	lim    *ratelog.Limiter

	// main guards a single server or Sentinel master, and on a Cluster
	// the calls whose node cannot be told. nodes holds one breaker per
	// Cluster master (address -> *breaker), so one master down fails only
	// its own slots.
	main  *breaker
	nodes sync.Map

	failures   atomic.Uint64 // failed calls, for Failures
	slotsKnown atomic.Bool   // a Cluster's slot map has been fetched

	mu        sync.Mutex // orders trip's probe start against Close
	closed    atomic.Bool
	closeOnce sync.Once
	// life ends at Close: probes stop, and one under way is cut short.
	life   context.Context
	end    context.CancelFunc
	probes sync.WaitGroup
}

var _ store.Store = (*Store)(nil)

// Open parses url (see ParseURL) and connects. It does not fail when Redis
// is unreachable: mail must flow, so the store starts with its breaker
// open, logs it, and recovers by itself when Redis answers. It fails only
// on a bad URL.
func Open(url string, opts Options) (*Store, error) {
	t, err := ParseURL(url)
	if err != nil {
		return nil, err
	}
	opts.defaults()
	s := &Store{
		c:      newClient(t, opts),
		target: t,
		opt:    opts,
		log:    opts.Logger.With("store", t.String()),
		lim:    ratelog.New(opts.LogEvery),
	}
	s.life, s.end = context.WithCancel(context.Background())
	s.cc, _ = s.c.(*goredis.ClusterClient)
	s.mail = s.c
	if opts.Batch {
		// Batches run concurrently and unordered: a session waits for
		// each answer before it sends the next command, so only another
		// session's commands could be reordered, and they are unrelated.
		ap, err := autoPipeliner(s.c, &goredis.AutoPipelineOptions{MaxConcurrentBatches: 4, Unordered: true})
		if err != nil {
			s.c.Close()
			return nil, fmt.Errorf("redis batching: %w", err)
		}
		s.ap, s.mail = ap, ap
	}
	s.main = &breaker{check: s.checkAll}

	ctx, cancel := context.WithTimeout(context.Background(), opts.DialTimeout)
	err = s.checkAll(ctx)
	cancel()
	if err != nil {
		s.log.Warn("redis unreachable at start; answering as --on-store-error says until it is back", "err", err)
		s.trip(s.main)
	} else {
		s.log.Info("redis store ready", "mode", string(t.Mode), "timeout", opts.Timeout)
		if opts.MigrateKeys {
			s.migrateInBackground()
		}
	}
	return s, nil
}

// newClient turns a Target into a go-redis client set for a mail path:
// bounded calls, no retries.
func newClient(t Target, o Options) goredis.UniversalClient {
	uo := &goredis.UniversalOptions{
		Addrs: t.Addrs,
		// No CLIENT SETNAME / SETINFO: a new connection costs one HELLO,
		// not three round trips, which matters when a pool refills
		// under load after an outage.
		DisableIdentity: true,
		DB:              t.DB,
		Username:        t.Username,
		Password:        t.Password,
		MasterName:      t.Master,
		// Context deadlines bound socket I/O only with this set; every
		// call carries one (Timeout).
		ContextTimeoutEnabled: true,
		ReadTimeout:           o.Timeout,
		WriteTimeout:          o.Timeout,
		PoolTimeout:           o.Timeout,
		DialTimeout:           o.DialTimeout,
		DialerRetries:         1,
		// No retries and no redirects: a script that ran but whose reply
		// was lost would count twice if sent again. A failed call is
		// answered by --on-store-error; after a Cluster's slots move, the
		// client reloads its slot map and the next call goes right.
		MaxRetries:    -1,
		MaxRedirects:  -1,
		PoolSize:      o.PoolSize,
		IsClusterMode: t.Mode == ModeCluster,
	}
	if t.TLS {
		uo.TLSConfig = o.TLSConfig
		if uo.TLSConfig == nil {
			uo.TLSConfig = &tls.Config{MinVersion: tls.VersionTLS12}
		}
	}
	return goredis.NewUniversalClient(uo)
}

func autoPipeliner(c goredis.UniversalClient, o *goredis.AutoPipelineOptions) (*goredis.AutoPipeliner, error) {
	switch c := c.(type) {
	case *goredis.Client:
		return c.AutoPipelineWithOptions(o)
	case *goredis.ClusterClient:
		return c.AutoPipelineWithOptions(o)
	}
	return nil, fmt.Errorf("no batching for a %T", c)
}

// Healthy reports whether every breaker is closed: Redis (each Cluster
// master) answered the last calls. For /readyz.
func (s *Store) Healthy() bool {
	if s.closed.Load() || s.main.open.Load() {
		return false
	}
	healthy := true
	s.nodes.Range(func(_, v any) bool {
		healthy = !v.(*breaker).open.Load()
		return healthy
	})
	return healthy
}

// Failures is how many calls have failed for want of Redis (timeouts,
// lost connections, Cluster errors), not counting those the open breaker
// refused at once.
func (s *Store) Failures() uint64 { return s.failures.Load() }

// Target is what the store URL named.
func (s *Store) Target() Target { return s.target }

// Close stops the probes and closes the connections. Later calls fail
// with store.ErrUnavailable. Close is idempotent.
func (s *Store) Close() error {
	var err error
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed.Store(true)
		s.mu.Unlock()
		s.end()
		s.probes.Wait()
		if s.ap != nil {
			s.ap.Close()
		}
		err = s.c.Close()
	})
	if err != nil {
		return fmt.Errorf("redis close: %w", err)
	}
	return nil
}

// checkAll loads the scripts on every master: a probe that also makes the
// next EVALSHA hit after a restart emptied the script cache.
func (s *Store) checkAll(ctx context.Context) error {
	switch c := s.c.(type) {
	case *goredis.ClusterClient:
		if err := c.ForEachMaster(ctx, loadScripts); err != nil {
			return err
		}
		s.slotsKnown.Store(true)
		return nil
	case *goredis.Client:
		return loadScripts(ctx, c)
	}
	return fmt.Errorf("unexpected client type %T", s.c)
}

// loadScripts sends every SCRIPT LOAD in one pipeline. (Script.Load
// cannot be used in a pipeline: it would record the empty reply as the
// script's hash.)
func loadScripts(ctx context.Context, c *goredis.Client) error {
	cmds, err := c.Pipelined(ctx, func(p goredis.Pipeliner) error {
		for _, src := range scriptSources {
			p.ScriptLoad(ctx, src)
		}
		return nil
	})
	if err != nil {
		return err
	}
	for _, cmd := range cmds {
		if err := cmd.Err(); err != nil {
			return err
		}
	}
	return nil
}

// SetClientLogger sends go-redis's own log lines (a failed dial, a pool
// problem), which it otherwise prints to stderr through a process-wide
// logger, to l at debug level: the store already reports outages once,
// at a bounded rate. It affects every go-redis client in the process, so
// the daemon calls it once at start-up.
func SetClientLogger(l *slog.Logger) { goredis.SetLogger(clientLogger{l}) }

type clientLogger struct{ l *slog.Logger }

func (c clientLogger) Printf(ctx context.Context, format string, v ...any) {
	c.l.DebugContext(ctx, fmt.Sprintf(format, v...), "source", "go-redis")
}
