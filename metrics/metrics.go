// Package metrics is policyd's Prometheus instrumentation (SPEC §7): the
// engine's decisions and hook latencies, the store's operations, open
// sessions, config reloads, plus the Go and process collectors, all on a
// private registry that the daemon serves on /metrics.
//
// No label ever holds a client address, a sender or a recipient: label
// values come from the configuration (rule names), the code (hooks,
// answers, store operations) or the protocol name, so the number of series
// is bounded whatever the traffic.
package metrics

import (
	"errors"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/policyd-mail/policyd/rules"
)

// Namespace starts every policyd series. A rule's own series, when a rule
// has some, use the rule name as subsystem: policyd_<rule>_<name>.
const Namespace = "policyd"

// Buckets of policyd_hook_duration_seconds: one hook runs every rule that
// implements it, each usually one store round trip (microseconds on the
// embedded store, a millisecond on Redis), so the buckets are dense below
// 10ms and reach a few seconds for a store at its --store-timeout on
// every rule.
var hookBuckets = []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5}

// Buckets of policyd_store_duration_seconds: one operation, from an
// in-process map (tens of microseconds) to a Redis call near the default
// 100ms --store-timeout and beyond.
var storeBuckets = []float64{.00005, .0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1}

// BuildInfo labels policyd_build_info.
type BuildInfo struct {
	Version   string // policyd's version, "" when unknown
	GoVersion string // runtime.Version()
}

// Registry holds policyd's metrics on a registry of its own. It implements
// rules.Metrics, so a chain built with it counts into it.
type Registry struct {
	reg *prometheus.Registry

	decisions *prometheus.CounterVec
	hookDur   *prometheus.HistogramVec
	// hookObs caches hookDur's observers per protocol and hook: a label
	// lookup per hook call was a visible share of a policy request.
	hookObs    sync.Map // protocol string → *[hookSlots]prometheus.Observer
	ruleErrors *prometheus.CounterVec
	panics     *prometheus.CounterVec
	reloads    *prometheus.CounterVec
	storeOps   *prometheus.CounterVec
	storeDur   *prometheus.HistogramVec
	limitHits  *prometheus.CounterVec

	delayMu sync.Mutex
	delays  map[string]*prometheus.HistogramVec // by rule name, made at its first delay
	events  map[string]*prometheus.CounterVec   // by series name, made at its first event
}

var _ rules.Metrics = (*Registry)(nil)

// New makes the registry with every policyd series registered.
func New(bi BuildInfo) *Registry {
	r := &Registry{reg: prometheus.NewRegistry()}
	r.decisions = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace, Name: "decisions_total",
		Help: "Decisions other than DECLINED, by front-end protocol, hook, rule instance and answer; dry_run=\"true\" for decisions that were logged and counted but not given to the MTA.",
	}, []string{"protocol", "hook", "rule", "answer", "dry_run"})
	r.hookDur = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: Namespace, Name: "hook_duration_seconds",
		Help:    "Time the rule chain took to answer one hook (a rule's teergrubing delay, which the front-end holds, is not included).",
		Buckets: hookBuckets,
	}, []string{"protocol", "hook"})
	r.ruleErrors = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace, Name: "rule_errors_total",
		Help: "Times a rule could not decide, by rule instance and kind (store: the store failed or timed out; panic: the rule panicked and was recovered).",
	}, []string{"rule", "kind"})
	r.panics = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace, Name: "panics_total",
		Help: "Rule panics recovered by the engine, by rule instance (also counted in policyd_rule_errors_total{kind=\"panic\"}).",
	}, []string{"rule"})
	r.reloads = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace, Name: "config_reloads_total",
		Help: "Configuration reloads (SIGHUP) by result; on failure the previous chain keeps running.",
	}, []string{"result"})
	r.storeOps = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace, Name: "store_operations_total",
		Help: "Store operations by operation and result (ok, unavailable: down or timed out, canceled: the session's context ended, error: anything else).",
	}, []string{"op", "result"})
	r.storeDur = prometheus.NewHistogramVec(prometheus.HistogramOpts{
		Namespace: Namespace, Name: "store_duration_seconds",
		Help:    "Time one store operation took, whatever its result.",
		Buckets: storeBuckets,
	}, []string{"op"})
	r.limitHits = prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: Namespace, Name: "limit_hits_total",
		Help: "Times a client hit a front-end limit (SPEC §8), by protocol and limit; the client was dropped, refused or, for sessions, its oldest tracked session ended.",
	}, []string{"protocol", "limit"})
	build := prometheus.NewGauge(prometheus.GaugeOpts{
		Namespace: Namespace, Name: "build_info",
		Help:        "Always 1; the labels name the running build.",
		ConstLabels: prometheus.Labels{"version": orUnknown(bi.Version), "goversion": orUnknown(bi.GoVersion)},
	})
	build.Set(1)

	r.reg.MustRegister(r.decisions, r.hookDur, r.ruleErrors, r.panics, r.reloads, r.storeOps, r.storeDur, r.limitHits, build,
		collectors.NewGoCollector(),
		collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}),
	)
	// Both results exist from the start, so an alert on the increase of
	// failures fires at the first one rather than at the second.
	for _, res := range []string{"success", "failure"} {
		r.reloads.WithLabelValues(res)
	}
	return r
}

func orUnknown(s string) string {
	if s == "" {
		return "unknown"
	}
	return s
}

// Gatherer is the registry, for tests and for serving it elsewhere.
func (r *Registry) Gatherer() prometheus.Gatherer { return r.reg }

// Handler serves the registry in the Prometheus exposition formats.
func (r *Registry) Handler() http.Handler {
	return promhttp.HandlerFor(r.reg, promhttp.HandlerOpts{Registry: r.reg, ErrorHandling: promhttp.ContinueOnError})
}

// SessionsOpen exports f, read at every scrape, as
// policyd_sessions_open{protocol}. Call it once per protocol.
func (r *Registry) SessionsOpen(protocol string, f func() int) {
	r.reg.MustRegister(prometheus.NewGaugeFunc(prometheus.GaugeOpts{
		Namespace: Namespace, Name: "sessions_open",
		Help:        "SMTP sessions a front-end holds right now (milter: open connections; policy: sessions tracked between requests).",
		ConstLabels: prometheus.Labels{"protocol": protocol},
	}, func() float64 { return float64(f()) }))
}

// StoreSize exports f, read once per scrape, as the embedded store's
// policyd_store_records and policyd_store_bytes{part}.
func (r *Registry) StoreSize(f func() (records, index, recordBytes, dead int)) {
	r.reg.MustRegister(storeSize{
		f: f,
		records: prometheus.NewDesc(Namespace+"_store_records",
			"Records the embedded store holds, expired ones not yet reclaimed included.", nil, nil),
		bytes: prometheus.NewDesc(Namespace+"_store_bytes",
			"Memory the embedded store's table uses, outside the Go heap: the hash index, the records, and the dead records among them that compaction will reclaim.",
			[]string{"part"}, nil),
	})
}

// storeSize is a collector, not four gauge functions, so that one scrape
// walks the store's shards once.
type storeSize struct {
	f              func() (records, index, recordBytes, dead int)
	records, bytes *prometheus.Desc
}

func (c storeSize) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.records
	ch <- c.bytes
}

func (c storeSize) Collect(ch chan<- prometheus.Metric) {
	n, index, recs, dead := c.f()
	ch <- prometheus.MustNewConstMetric(c.records, prometheus.GaugeValue, float64(n))
	ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.GaugeValue, float64(index), "index")
	ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.GaugeValue, float64(recs), "records")
	ch <- prometheus.MustNewConstMetric(c.bytes, prometheus.GaugeValue, float64(dead), "dead")
}

// StateHealth is what the embedded store reports about its state
// directory, read at every scrape.
type StateHealth struct {
	PersistedAt    time.Time // every update made before it is on disk
	Behind         bool      // the disk is behind memory (writes fail, or a snapshot is owed)
	BufferBytes    int       // journal records waiting to be written
	DroppedRecords int64     // journal records dropped while the disk refused writes
	// From the start-up load: records damage cost (-1: unknown) and the
	// bytes that could not be read.
	LoadLost         int
	LoadDamagedBytes int64
}

// State exports f as the policyd_state_* series of the embedded store.
func (r *Registry) State(f func() StateHealth) {
	d := func(name, help string) *prometheus.Desc {
		return prometheus.NewDesc(Namespace+"_state_"+name, help, nil, nil)
	}
	r.reg.MustRegister(stateHealth{f: f, descs: [6]*prometheus.Desc{
		d("persisted_timestamp_seconds", "Every update made before this time is in the state directory; alert when it falls behind time()."),
		d("behind", "1 while the state directory is behind memory: journal writes fail, or records were dropped and a snapshot is pending."),
		d("journal_buffer_bytes", "Journal records in memory waiting to be written; bounded while writes fail."),
		d("journal_dropped_records_total", "Journal records dropped because the disk refused writes past the buffer's bound; a snapshot writes them once it can."),
		d("load_records_lost", "Records the damage found at start-up cost (-1: an unknown number); the damaged files are kept as *.damaged.TIME."),
		d("load_damaged_bytes", "Bytes of the state files that could not be read at start-up."),
	}})
}

type stateHealth struct {
	f     func() StateHealth
	descs [6]*prometheus.Desc
}

func (c stateHealth) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range c.descs {
		ch <- d
	}
}

func (c stateHealth) Collect(ch chan<- prometheus.Metric) {
	h := c.f()
	behind := 0.0
	if h.Behind {
		behind = 1
	}
	vals := [6]float64{float64(h.PersistedAt.UnixNano()) / 1e9, behind, float64(h.BufferBytes), float64(h.DroppedRecords), float64(h.LoadLost), float64(h.LoadDamagedBytes)}
	for i, d := range c.descs {
		t := prometheus.GaugeValue
		if i == 3 {
			t = prometheus.CounterValue
		}
		ch <- prometheus.MustNewConstMetric(d, t, vals[i])
	}
}

// LimitHits returns what a front-end calls when a client hits one of its
// limits, counted in policyd_limit_hits_total{protocol,limit}. Every
// limit named is shown at zero from the start, so an alert on an increase
// fires at the first hit.
func (r *Registry) LimitHits(protocol string, limits ...string) func(limit string) {
	for _, l := range limits {
		r.limitHits.WithLabelValues(protocol, l)
	}
	return func(limit string) { r.limitHits.WithLabelValues(protocol, limit).Inc() }
}

// DoubleWiring returns what counts, in policyd_double_wiring_total, an
// SMTP session seen through both front-ends.
func (r *Registry) DoubleWiring() func() {
	c := prometheus.NewCounter(prometheus.CounterOpts{Namespace: Namespace, Name: "double_wiring_total",
		Help: "SMTP sessions that came through both the milter and the policy protocol (one daemon wired twice into one MTA)."})
	r.reg.MustRegister(c)
	return c.Inc
}

// DryRun exports policyd_dry_run: 1 while --dry-run tells the MTA to
// continue whatever the rules decide.
func (r *Registry) DryRun(on bool) {
	v := 0.0
	if on {
		v = 1
	}
	g := prometheus.NewGauge(prometheus.GaugeOpts{Namespace: Namespace, Name: "dry_run",
		Help: "1 while --dry-run is on: every rule decides and records, the MTA is told to continue."})
	g.Set(v)
	r.reg.MustRegister(g)
}

// ConfigReload counts one reload of the configuration directory.
func (r *Registry) ConfigReload(ok bool) {
	if ok {
		r.reloads.WithLabelValues("success").Inc()
	} else {
		r.reloads.WithLabelValues("failure").Inc()
	}
}

// Decision counts one decision other than DECLINED (rules.Metrics).
func (r *Registry) Decision(protocol string, h rules.Hook, rule string, c rules.Code, dryRun bool) {
	r.decisions.WithLabelValues(protocol, h.String(), rule, c.String(), strconv.FormatBool(dryRun)).Inc()
}

// HookDuration observes one run of a hook (rules.Metrics).
func (r *Registry) HookDuration(protocol string, h rules.Hook, d time.Duration) {
	if int(h) >= hookSlots {
		r.hookDur.WithLabelValues(protocol, h.String()).Observe(d.Seconds())
		return
	}
	obs, ok := r.hookObs.Load(protocol)
	if !ok {
		var all [hookSlots]prometheus.Observer
		for i := range all {
			all[i] = r.hookDur.WithLabelValues(protocol, rules.Hook(i).String())
		}
		obs, _ = r.hookObs.LoadOrStore(protocol, &all)
	}
	obs.(*[hookSlots]prometheus.Observer)[h].Observe(d.Seconds())
}

// hookSlots covers the hooks a chain times (observers are not timed).
const hookSlots = int(rules.HookDisconnect) + 1

// Buckets of policyd_<rule>_delay_seconds: spamthrottle's pacing, from a
// few milliseconds to minutes (its stmax).
var delayBuckets = []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120, 300}

// Delayed observes a delay a rule asked for, in
// policyd_<rule>_delay_seconds{protocol,hook,rule} (rules.Metrics): the
// series of a rule that delays (spamthrottle) appear at its first delay.
// It is the delay asked; the front-end caps what it holds to the MTA's
// timeout (--policy-max-delay, --milter-max-delay).
func (r *Registry) Delayed(protocol string, h rules.Hook, rule string, d time.Duration) {
	name, _, _ := strings.Cut(rule, ":")
	r.delayMu.Lock()
	hv, ok := r.delays[name]
	if !ok {
		hv = prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: Namespace, Subsystem: name, Name: "delay_seconds",
			Help:    "Delays the rule asked the front-end to hold a reply for, by protocol, hook and rule instance (before the front-end's cap).",
			Buckets: delayBuckets,
		}, []string{"protocol", "hook", "rule"})
		var ok bool
		if hv, ok = registerLate(r.reg, hv); !ok {
			r.delayMu.Unlock()
			return
		}
		if r.delays == nil {
			r.delays = map[string]*prometheus.HistogramVec{}
		}
		r.delays[name] = hv
	}
	r.delayMu.Unlock()
	hv.WithLabelValues(protocol, h.String(), rule).Observe(d.Seconds())
}

// registerLate registers a series made at its first use, on the hot
// path: one already registered under that name is taken instead, and a
// clash with a series of another kind gives ok false, never a panic.
func registerLate[C prometheus.Collector](reg *prometheus.Registry, c C) (C, bool) {
	err := reg.Register(c)
	if err == nil {
		return c, true
	}
	var are prometheus.AlreadyRegisteredError
	if errors.As(err, &are) {
		if existing, ok := are.ExistingCollector.(C); ok {
			return existing, true
		}
	}
	return c, false
}

// eventHelp explains the rules' own events; an event not listed gets a
// generic help.
var eventHelp = map[string]string{
	"ratelimit_exceeded": "Times a ratelimit instance refused because a budget was spent (dry-run refusals included; policyd_decisions_total tells them apart). No key value is a label.",
}

// RuleEvent counts one event of a rule's own in
// policyd_<rule name>_<event>_total{rule} (rules.Metrics); the series
// appears at its first event.
func (r *Registry) RuleEvent(rule, event string) {
	name, _, _ := strings.Cut(rule, ":")
	series := name + "_" + event
	r.delayMu.Lock()
	cv, ok := r.events[series]
	if !ok {
		help := eventHelp[series]
		if help == "" {
			help = "Times the rule's " + event + " event happened, by rule instance."
		}
		cv = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: Namespace, Name: series + "_total", Help: help}, []string{"rule"})
		var ok bool
		if cv, ok = registerLate(r.reg, cv); !ok {
			r.delayMu.Unlock()
			return
		}
		if r.events == nil {
			r.events = map[string]*prometheus.CounterVec{}
		}
		r.events[series] = cv
	}
	r.delayMu.Unlock()
	cv.WithLabelValues(rule).Inc()
}

// RuleError counts a rule that could not decide (rules.Metrics). The hook
// is left out of the labels: which rule fails, and how, is what an
// operator acts on; the log line has the hook.
func (r *Registry) RuleError(rule string, _ rules.Hook, kind string) {
	r.ruleErrors.WithLabelValues(rule, kind).Inc()
	if kind == "panic" {
		r.panics.WithLabelValues(rule).Inc()
	}
}
