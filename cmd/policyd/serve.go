package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	stdlog "log"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/http/pprof"
	"net/netip"
	"os"
	"os/signal"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/policyd-mail/policyd/internal/listen"
	"github.com/policyd-mail/policyd/metrics"
	"github.com/policyd-mail/policyd/milter"
	"github.com/policyd-mail/policyd/postfixpolicy"
	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/store"
	"github.com/policyd-mail/policyd/store/memory"
	redisstore "github.com/policyd-mail/policyd/store/redis"
)

func serve(args []string, stderr io.Writer) int {
	var o options
	fset := flag.NewFlagSet("policyd serve", flag.ContinueOnError)
	fset.SetOutput(stderr)
	o.register(fset)
	err := parseFlags(fset, args, os.LookupEnv)
	if err == nil {
		err = unknownEnv(fset, os.Environ())
	}
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintln(stderr, "policyd:", err)
		return 2
	}
	log, err := newLogger(stderr, o.logFormat, o.logLevel)
	if err != nil {
		fmt.Fprintln(stderr, "policyd:", err)
		return 2
	}
	slog.SetDefault(log)
	// go-milter logs through the standard log package: its lines come
	// into ours, rate-limited, since a peer can cause one per connection.
	stdlog.SetFlags(0)
	stdlog.SetOutput(milter.LibraryLog(log, time.Second))
	// Signals are caught before start-up, so a SIGTERM then still drains.
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGHUP)
	defer signal.Stop(sigs)
	d, err := start(o, log)
	if err != nil {
		log.Error("policyd cannot start", "err", err)
		return 1
	}
	for sig := range sigs {
		if sig == syscall.SIGHUP {
			d.reload()
			continue
		}
		log.Info("stopping: no new connections, finishing open requests", "signal", sig.String(), "timeout", o.drainTimeout)
		break
	}
	if err := d.stop(o.drainTimeout); err != nil {
		log.Error("stopped with open requests cut short", "err", err)
		return 0
	}
	log.Info("stopped")
	return 0
}

// daemon is a running policyd: its chain, store and front-ends.
type daemon struct {
	o     options
	log   *slog.Logger
	opts  rules.Options // what every chain is built with
	chain atomic.Pointer[rules.Chain]
	store store.Store
	// rawStore is store without the metrics wrapper: the admin API and
	// readiness probes are not rule traffic.
	rawStore   store.Store
	adminToken string
	metrics    *metrics.Registry
	fronts     map[string]frontEnd
	listeners  map[string]net.Listener
	wg         sync.WaitGroup
	ready      atomic.Bool
	stopping   atomic.Bool
	// lastReload is the last reload if it was refused, for /api/v1/chain.
	lastReload atomic.Pointer[reloadFailure]
}

type reloadFailure struct {
	at  time.Time
	err string
}

func openStore(o options) (store.Store, error) {
	switch {
	case o.storeURL == "memory":
		// In-process calls cannot hang, so --store-timeout does not apply.
		// The store persists itself under --state-dir (store/memory/persist.go).
		st, err := memory.Open(memory.Options{Dir: o.stateDir, Logger: slog.Default(), MaxLoss: o.stateMaxLoss})
		if err != nil {
			return nil, fmt.Errorf("store memory: %w", err)
		}
		return st, nil
	case strings.HasPrefix(o.storeURL, "redis"):
		// The Redis store bounds every call by --store-timeout itself
		// (and fails at once while its breaker is open). An unreachable Redis does not
		// stop start-up: mail flows per --on-store-error until it is back.
		redisstore.SetClientLogger(slog.Default())
		st, err := redisstore.Open(o.storeURL, redisstore.Options{Timeout: o.storeTimeout, Logger: slog.Default(), MigrateKeys: true, Batch: o.redisBatch})
		if err != nil {
			return nil, err
		}
		return st, nil
	}
	return nil, fmt.Errorf("store %q: not a store URL (memory, redis://host:port/db, redis+sentinel://h1:p,h2:p/master, redis+cluster://h1:p,h2:p)", o.storeURL)
}

// exportStoreSize puts the embedded store's size on /metrics; Redis
// reports its own.
func exportStoreSize(m *metrics.Registry, st store.Store) {
	if mem, ok := st.(*memory.Store); ok {
		m.StoreSize(func() (int, int, int, int) {
			s := mem.Stats()
			return s.Records, s.IndexBytes, s.RecordBytes, s.DeadBytes
		})
		if !mem.Persisted() {
			return
		}
		m.State(func() metrics.StateHealth {
			p, l := mem.Persistence(), mem.LoadReport()
			return metrics.StateHealth{
				PersistedAt: p.PersistedAt, Behind: p.Behind != "", BufferBytes: p.BufferBytes, DroppedRecords: p.DroppedRecords,
				LoadLost: l.Lost, LoadDamagedBytes: l.DamagedBytes,
			}
		})
	}
}

// frontEnd is what serves on a listener: the policy and milter servers
// and the HTTP server.
type frontEnd interface {
	Serve(net.Listener) error
	Shutdown(context.Context) error
}

func start(o options, log *slog.Logger) (*daemon, error) {
	policy, err := rules.ParseStoreErrorPolicy(o.onStoreError)
	if err != nil {
		return nil, err
	}
	token, err := readToken(o.adminToken)
	if err != nil {
		return nil, err
	}
	// The configuration is checked before anything is bound or loaded:
	// a typo must not keep the MTA's requests waiting for a state load
	// only to refuse them.
	fsys, name, err := configDir(o.config)
	if err != nil {
		return nil, err
	}
	if _, _, err := rules.Load(fsys, name, rules.Options{PluginDirs: o.pluginDirs()}); err != nil {
		return nil, configFailure(log, name, err)
	}
	// The listeners are bound before the store is loaded, which takes
	// seconds with a million clients in the state directory: meanwhile
	// the kernel queues the MTA's connections and their requests wait
	// for the answer, where a refused connection would be answered by
	// the MTA's default action (Postfix's: tempfail).
	lns := map[string]net.Listener{}
	closeAll := func() {
		for _, l := range lns {
			l.Close()
		}
	}
	for _, a := range []struct{ name, addr string }{
		{"policy delegation", o.policyListen}, {"milter", o.milterListen}, {"http", o.httpListen},
	} {
		if a.addr == "" {
			continue
		}
		ln, err := listen.Listen(a.addr)
		if err != nil {
			closeAll()
			return nil, err
		}
		lns[a.name] = ln
	}
	raw, err := openStore(o)
	if err != nil {
		closeAll()
		return nil, err
	}
	m := metrics.New(metrics.BuildInfo{Version: buildVersion(), GoVersion: runtime.Version()})
	st := metrics.InstrumentStore(raw, m)
	exportStoreSize(m, raw)
	d := &daemon{o: o, log: log, store: st, rawStore: raw, adminToken: token, metrics: m, fronts: map[string]frontEnd{}, listeners: lns}
	overlap := &rules.Overlap{
		Found: m.DoubleWiring(),
		Warn: func(client netip.Addr, port int) {
			log.Warn("one SMTP session came through both the milter and the policy protocol: wire policyd to an MTA through exactly one of them, or every session and message is counted twice",
				"client", client.String(), "port", port)
		},
	}
	d.opts = rules.Options{Store: st, Logger: log, OnStoreError: policy, DryRun: o.dryRun, Metrics: m, Overlap: overlap, PluginDirs: o.pluginDirs(),
		ReadAhead: o.storeURL != "memory"}
	c, err := d.load()
	if err != nil {
		closeAll()
		st.Close()
		return nil, err
	}
	d.chain.Store(c)
	m.DryRun(o.dryRun)
	if o.dryRun {
		log.Warn("dry run: every rule decides, logs and records its state as it would live, and the MTA is told to continue; forget a client to undo what the trial recorded of it")
	}
	fronts := []struct {
		name string
		mk   func() frontEnd
	}{
		{"policy delegation", func() frontEnd {
			srv := postfixpolicy.New(postfixpolicy.Config{
				Logger: log, MaxDelay: o.policyDelay,
				Limits:      postfixpolicy.Limits{MaxLine: o.policyMaxLine, MaxAttrs: o.policyMaxAttrs, MaxRequest: o.policyMaxRequest},
				MaxConns:    o.policyMaxConns,
				MaxSessions: o.policyMaxSessions,
				IdleTimeout: o.policyIdle,
				MaxConnTime: o.policyMaxConnTime,
				LimitHit:    m.LimitHits("policy", postfixpolicy.LimitNames...),
			}, d.chain.Load)
			m.SessionsOpen("policy", srv.Sessions)
			return srv
		}},
		{"milter", func() frontEnd {
			srv := milter.New(milter.Config{
				Logger:      log,
				MaxPacket:   uint32(o.milterMaxPacket),
				MaxMacros:   o.milterMaxMacros,
				MaxConns:    o.milterMaxConns,
				IdleTimeout: o.milterIdle,
				MaxConnTime: o.milterMaxConnTime,
				LimitHit:    m.LimitHits("milter", milter.LimitNames...),
			}, d.chain.Load)
			m.SessionsOpen("milter", srv.Open)
			return srv
		}},
		{"http", func() frontEnd {
			return httpFront{&http.Server{Handler: d.httpHandler(), ReadHeaderTimeout: 5 * time.Second,
				// Its own log, not the standard logger go-milter shares.
				ErrorLog: slog.NewLogLogger(log.With("listener", "http").Handler(), slog.LevelWarn)}}
		}},
	}
	for _, f := range fronts {
		ln, ok := lns[f.name]
		if !ok {
			continue
		}
		fe := f.mk()
		d.fronts[f.name] = fe
		d.wg.Go(func() {
			if err := fe.Serve(ln); err != nil && !d.stopping.Load() {
				log.Error("listener failed", "listener", f.name, "err", err)
				d.ready.Store(false)
			}
		})
		log.Info(f.name+" listening", "addr", ln.Addr().String())
	}
	d.ready.Store(true)
	return d, nil
}

// httpFront adapts http.Server, whose Serve reports a normal shutdown as
// an error.
type httpFront struct{ *http.Server }

func (h httpFront) Serve(ln net.Listener) error {
	if err := h.Server.Serve(ln); !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	return nil
}

// load builds a chain from the config directory and logs it.
func (d *daemon) load() (*rules.Chain, error) {
	fsys, name, err := configDir(d.o.config)
	if err != nil {
		return nil, err
	}
	c, warns, err := rules.Load(fsys, name, d.opts)
	for _, w := range warns {
		d.log.Warn("config", "problem", w.Error())
	}
	if err != nil {
		return nil, configFailure(d.log, name, err)
	}
	d.log.Info("chain loaded", "config", name, "rules", strings.Join(c.Rules(), ","))
	for _, w := range listenerWarnings(c, d.o.policyListen, d.o.milterListen, d.o.policyDelay) {
		d.log.Warn(w.msg, w.attrs...)
	}
	for _, line := range strings.Split(strings.TrimSpace(c.Describe()), "\n") {
		d.log.Info("chain", "rule", line)
	}
	return c, nil
}

// listenerWarning is something a rule of the chain cannot do with the
// listeners the daemon runs.
type listenerWarning struct {
	msg   string
	attrs []any
}

func (w listenerWarning) String() string {
	var b strings.Builder
	b.WriteString(w.msg)
	for i := 0; i+1 < len(w.attrs); i += 2 {
		fmt.Fprintf(&b, " %v=%v", w.attrs[i], w.attrs[i+1])
	}
	return b.String()
}

// listenerWarnings compares the chain with the listeners: a delay longer
// than the policy protocol allows, a rule that needs the milter protocol
// when the milter listener is off. serve logs them; check prints them.
func listenerWarnings(c *rules.Chain, policyListen, milterListen string, policyDelay time.Duration) []listenerWarning {
	var out []listenerWarning
	if policyListen != "" {
		for _, rule := range slices.Sorted(maps.Keys(c.MaxDelays())) {
			if max := c.MaxDelays()[rule]; max > policyDelay {
				out = append(out, listenerWarning{"a rule may delay longer than --policy-max-delay allows behind the policy protocol: its delays there are cut to it",
					[]any{"rule", rule, "max_delay", max, "policy_max_delay", policyDelay}})
			}
		}
	}
	if milterListen == "" {
		needs := c.NeedsMilter()
		for _, rule := range slices.Sorted(maps.Keys(needs)) {
			out = append(out, listenerWarning{"a rule needs the milter front-end, and --milter-listen is off",
				[]any{"rule", rule, "why", needs[rule]}})
		}
	}
	return out
}

// configFailure logs each problem of a configuration that did not load
// and sums them up.
func configFailure(log *slog.Logger, name string, err error) error {
	var ce rules.ConfigErrors
	if errors.As(err, &ce) {
		for _, e := range ce {
			log.Error("config", "problem", e.Error())
		}
		return fmt.Errorf("%s: %s in the configuration", name, count(len(ce), "problem"))
	}
	return err
}

// reload builds the new chain aside; a bad config keeps the old one.
func (d *daemon) reload() {
	c, err := d.load()
	d.metrics.ConfigReload(err == nil)
	if err != nil {
		// Stored before the line is logged: whoever reads the line may
		// ask /api/v1/chain at once.
		d.lastReload.Store(&reloadFailure{at: time.Now(), err: err.Error()})
		d.log.Error("reload refused, the previous chain keeps running", "err", err)
		return
	}
	d.lastReload.Store(nil)
	d.chain.Store(c)
	d.log.Info("reloaded")
}

func (d *daemon) httpHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("GET /metrics", d.metrics.Handler())
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "ok\n")
	})
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, r *http.Request) {
		if !d.ready.Load() {
			http.Error(w, "not ready: a listener is down", http.StatusServiceUnavailable)
			return
		}
		if err := d.probeStore(r.Context()); err != nil {
			http.Error(w, "not ready: "+err.Error(), http.StatusServiceUnavailable)
			return
		}
		// A degraded store still answers every request from memory, so
		// it stays ready (a 503 would take the MTA's traffic away, which
		// is worse than a disk that lags): the reasons go in the body,
		// one "degraded:" line each, for a check that reads it.
		io.WriteString(w, "ready\n")
		if deg, ok := d.rawStore.(interface{ Degraded() []string }); ok {
			for _, why := range deg.Degraded() {
				io.WriteString(w, "degraded: "+why+"\n")
			}
		}
	})
	admin := adminAuth(d.adminToken, http.HandlerFunc(d.adminClients))
	mux.Handle("GET /api/v1/chain", adminAuth(d.adminToken, http.HandlerFunc(d.adminChain)))
	mux.Handle("GET /api/v1/clients/{client...}", admin)
	mux.Handle("DELETE /api/v1/clients/{client...}", admin)
	keys := adminAuth(d.adminToken, http.HandlerFunc(d.adminKeys))
	mux.Handle("GET /api/v1/keys/{name}/{value...}", keys)
	mux.Handle("DELETE /api/v1/keys/{name}/{value...}", keys)
	// Profiles for `go tool pprof http://ADDR/debug/pprof/profile`,
	// guarded like the admin API.
	mux.Handle("GET /debug/pprof/", adminAuth(d.adminToken, http.HandlerFunc(pprof.Index)))
	mux.Handle("GET /debug/pprof/profile", adminAuth(d.adminToken, http.HandlerFunc(pprof.Profile)))
	mux.Handle("GET /debug/pprof/trace", adminAuth(d.adminToken, http.HandlerFunc(pprof.Trace)))
	return mux
}

// probeStore is one read bounded by --store-timeout. On Redis it is a
// round trip while the breaker is closed and an immediate failure while
// it is open, so /readyz follows the store without adding to an outage.
func (d *daemon) probeStore(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, max(d.o.storeTimeout, 10*time.Millisecond))
	defer cancel()
	if _, _, err := d.rawStore.Get(ctx, store.Prefix+"readyz"); err != nil {
		return fmt.Errorf("store: %w", err)
	}
	return nil
}

// stop drains the front-ends side by side within timeout, then closes
// the store.
func (d *daemon) stop(timeout time.Duration) error {
	d.stopping.Store(true)
	d.ready.Store(false)
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var mu sync.Mutex
	var errs []error
	var stops sync.WaitGroup
	for name, fe := range d.fronts {
		stops.Go(func() {
			if err := fe.Shutdown(ctx); err != nil {
				mu.Lock()
				errs = append(errs, fmt.Errorf("%s: %w", name, err))
				mu.Unlock()
			}
		})
	}
	stops.Wait()
	// A stop right after start-up (a SIGTERM during the state load) can
	// come before a front-end's Serve has taken its listener, which it
	// then no longer does: closed here, the MTA's queued connections are
	// refused at once and a socket file is removed.
	for _, ln := range d.listeners {
		ln.Close()
	}
	d.wg.Wait()
	if err := d.store.Close(); err != nil {
		errs = append(errs, fmt.Errorf("store: %w", err))
	}
	return errors.Join(errs...)
}
