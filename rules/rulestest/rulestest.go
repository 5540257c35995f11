// Package rulestest runs rules in-process: a chain from config text, the
// embedded store, a fake clock and a session builder.
package rulestest

import (
	"bytes"
	"context"
	"log/slog"
	"net/netip"
	"sync"
	"testing"
	"testing/fstest"
	"time"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/store"
	"github.com/policyd-mail/policyd/store/memory"
)

// Clock is a fake clock that moves only when told.
type Clock struct {
	mu  sync.Mutex
	now time.Time
}

// NewClock starts at a fixed, arbitrary instant.
func NewClock() *Clock {
	return &Clock{now: time.Date(2026, 11, 23, 9, 0, 0, 0, time.UTC)}
}

// Now returns the fake time.
func (c *Clock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

// Advance moves the fake time forward.
func (c *Clock) Advance(d time.Duration) {
	c.mu.Lock()
	c.now = c.now.Add(d)
	c.mu.Unlock()
}

// Harness is a chain on a store (memory unless Options.Store) with a
// fake clock.
type Harness struct {
	T     testing.TB
	Clock *Clock
	Store store.Store
	Chain *rules.Chain
	Logs  *bytes.Buffer
	Warns rules.ConfigErrors
}

// Options tune a harness.
type Options struct {
	OnStoreError rules.StoreErrorPolicy
	DryRun       bool
	Metrics      rules.Metrics
	// Store replaces the memory store, e.g. by Redis. Values written with
	// the fake clock's time are compared by the rules themselves, but key
	// expiry is the store's own clock: a scenario that advances the fake
	// clock past a ttl needs the memory store.
	Store store.Store
	// ReadAhead sends the connect hook's declared reads early, as the
	// daemon does on Redis (rules.Options.ReadAhead).
	ReadAhead bool
}

// New builds a chain from a plugins file and the rules' own files.
func New(t testing.TB, plugins string, files map[string]string) *Harness {
	return NewWith(t, plugins, files, Options{})
}

// NewWith is New with options.
func NewWith(t testing.TB, plugins string, files map[string]string, o Options) *Harness {
	t.Helper()
	fsys := fstest.MapFS{"plugins": {Data: []byte(plugins)}}
	for name, text := range files {
		fsys[name] = &fstest.MapFile{Data: []byte(text)}
	}
	h := &Harness{T: t, Clock: NewClock(), Logs: &bytes.Buffer{}}
	if o.Store != nil {
		h.Store = o.Store
	} else {
		h.Store = memory.New(memory.Options{Now: h.Clock.Now, SweepInterval: -1})
	}
	t.Cleanup(func() { _ = h.Store.Close() })
	logger := slog.New(slog.NewTextHandler(&lockedWriter{w: h.Logs}, &slog.HandlerOptions{Level: slog.LevelDebug}))
	c, warns, err := rules.Load(fsys, "config", rules.Options{
		Store: h.Store, Clock: h.Clock, Logger: logger,
		OnStoreError: o.OnStoreError, DryRun: o.DryRun, Metrics: o.Metrics, ReadAhead: o.ReadAhead,
	})
	if err != nil {
		t.Fatalf("config does not load:\n%v", err)
	}
	h.Chain, h.Warns = c, warns
	return h
}

// Session starts a session from ip (port 40000) on the harness's chain.
func (h *Harness) Session(ip string) *rules.Conversation {
	h.T.Helper()
	a, err := netip.ParseAddr(ip)
	if err != nil {
		h.T.Fatalf("bad test address %q: %v", ip, err)
	}
	return rules.NewConversation(h.Chain, "test", a, 40000, h.Clock.Now())
}

// Run runs one hook.
func (h *Harness) Run(hook rules.Hook, s *rules.Conversation) rules.Decision {
	return h.Chain.Run(context.Background(), hook, s.Session)
}

// Connect starts a session from ip and runs its connect hook.
func (h *Harness) Connect(ip string) (*rules.Conversation, rules.Decision) {
	s := h.Session(ip)
	return s, h.Run(rules.HookConnect, s)
}

type lockedWriter struct {
	mu sync.Mutex
	w  *bytes.Buffer
}

func (l *lockedWriter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.w.Write(p)
}
