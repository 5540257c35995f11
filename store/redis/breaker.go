package redis

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync/atomic"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/policyd-mail/policyd/store"
)

// errOpen is what calls get, at once, while a breaker is open.
var errOpen = fmt.Errorf("circuit open, redis is being probed: %w", store.ErrUnavailable)

// errClosed is what calls get after Close.
var errClosed = fmt.Errorf("store closed: %w", store.ErrUnavailable)

// breaker counts consecutive failed calls to one server. At Options.Failures
// it opens: calls fail at once, and a probe checks the server every
// ProbeInterval until it answers, then closes it.
type breaker struct {
	name  string // "" for the main breaker, else a Cluster master's address
	check func(context.Context) error

	failures atomic.Int64
	open     atomic.Bool
	since    atomic.Int64           // unix ns the breaker opened
	sample   atomic.Pointer[string] // the key of the last failed call
}

func (b *breaker) ok() {
	if b.failures.Load() != 0 {
		b.failures.Store(0)
	}
}

// failed counts a failure and opens the breaker at the threshold.
func (s *Store) failed(b *breaker, key string) {
	b.sample.Store(&key)
	if b.failures.Add(1) >= int64(s.opt.Failures) {
		s.trip(b)
	}
}

// trip opens b and starts its probe, once.
func (s *Store) trip(b *breaker) {
	// Under mu, so no probe starts once Close is waiting for them.
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed.Load() || !b.open.CompareAndSwap(false, true) {
		return
	}
	b.since.Store(time.Now().UnixNano())
	s.log.Warn("redis unreachable: answering at once without it, probing in the background",
		"node", b.name, "probe_every", s.opt.ProbeInterval)
	s.probes.Go(func() { s.probe(b) })
}

// probe checks the server until it answers or the store closes.
func (s *Store) probe(b *breaker) {
	t := time.NewTicker(s.opt.ProbeInterval)
	defer t.Stop()
	for {
		select {
		case <-s.life.Done():
			return
		case <-t.C:
		}
		ctx, cancel := context.WithTimeout(s.life, s.opt.DialTimeout)
		err := b.check(ctx)
		cancel()
		if err == nil {
			b.failures.Store(0)
			b.open.Store(false)
			down := time.Since(time.Unix(0, b.since.Load())).Round(time.Millisecond)
			s.log.Info("redis reachable again", "node", b.name, "down_for", down)
			return
		}
	}
}

// breakerFor picks the breaker guarding key: on a Cluster the one of the
// master serving its slot (from the client's cached slot map, no round
// trip), else the main one.
func (s *Store) breakerFor(ctx context.Context, key string) *breaker {
	if s.cc == nil {
		return s.main
	}
	if s.main.open.Load() && !s.slotsKnown.Load() {
		// Never reached the Cluster: finding the node would mean
		// fetching the slot map on every call.
		return s.main
	}
	node, err := s.cc.MasterForKey(ctx, key)
	if err != nil {
		return s.main
	}
	s.slotsKnown.Store(true)
	addr := node.Options().Addr
	if b, ok := s.nodes.Load(addr); ok {
		return b.(*breaker)
	}
	b := &breaker{name: addr}
	b.check = func(ctx context.Context) error { return s.checkSlot(ctx, b) }
	actual, _ := s.nodes.LoadOrStore(addr, b)
	return actual.(*breaker)
}

// checkSlot probes a Cluster master's breaker the way calls would use it:
// a read of the last failed key, routed by the client. It fails while the
// master is down, still joining (CLUSTERDOWN) or its slots unserved
// (MOVED), and succeeds once the slot is served, there or, after a
// failover, by the replica that took over.
func (s *Store) checkSlot(ctx context.Context, b *breaker) error {
	key := b.sample.Load()
	if key == nil {
		return nil
	}
	if err := s.cc.Exists(ctx, *key).Err(); err != nil {
		return err
	}
	// A restarted server has lost its scripts: load them now so the next
	// EVALSHA hits (Script.Run would also recover, with one more trip).
	if node, err := s.cc.MasterForKey(ctx, *key); err == nil {
		_ = loadScripts(ctx, node)
	}
	return nil
}

// call runs one operation on key under the timeout and the breaker, and
// turns its error into the store's: the caller's own cancellation, a wrong
// type, or store.ErrUnavailable for anything that says Redis cannot answer.
func (s *Store) call(ctx context.Context, op, key string, f func(ctx context.Context) error) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("redis %s %s: %w", op, key, err)
	}
	if s.closed.Load() {
		return fmt.Errorf("redis %s %s: %w", op, key, errClosed)
	}
	// Before the timer, so an open breaker costs next to nothing. (On a
	// Cluster, breakerFor reads the cached slot map: no network.)
	b := s.breakerFor(ctx, key)
	if b.open.Load() {
		return fmt.Errorf("redis %s %s: %w", op, key, errOpen)
	}
	cctx, cancel := context.WithTimeout(ctx, s.opt.Timeout)
	defer cancel()
	err := f(cctx)
	if err == nil {
		b.ok()
		return nil
	}
	switch {
	case ctx.Err() != nil:
		// The caller gave up first: say so, and do not blame Redis.
		if errors.Is(ctx.Err(), context.DeadlineExceeded) {
			return fmt.Errorf("redis %s %s: %w: %w", op, key, store.ErrUnavailable, ctx.Err())
		}
		return fmt.Errorf("redis %s %s: %w", op, key, ctx.Err())
	case goredis.HasErrorPrefix(err, "WRONGTYPE"):
		b.ok()
		return fmt.Errorf("redis %s %s: %w: %w", op, key, store.ErrWrongType, err)
	case goredis.HasErrorPrefix(err, "MOVED") || goredis.HasErrorPrefix(err, "ASK"):
		// The slot moved (resharding, failover): the client reloads its
		// slot map and the next call goes to the right master. Not a sign
		// that this master is down, so not counted against it.
		return fmt.Errorf("redis %s %s: %w: %w", op, key, store.ErrUnavailable, err)
	case unavailable(err):
		s.failures.Add(1)
		s.failed(b, key)
		if n, ok := s.lim.Allow(time.Now()); ok {
			s.log.Warn("redis call failed", "op", op, "key", key, "err", err, "suppressed", n)
		}
		if errors.Is(err, context.DeadlineExceeded) {
			return fmt.Errorf("redis %s %s: no answer within %v: %w", op, key, s.opt.Timeout, store.ErrUnavailable)
		}
		return fmt.Errorf("redis %s %s: %w: %w", op, key, store.ErrUnavailable, err)
	default:
		// Redis answered, with an error about the data (not an
		// integer, overflow): the server is fine.
		b.ok()
		return fmt.Errorf("redis %s %s: %w", op, key, err)
	}
}

// Error replies that mean the server cannot serve now, rather than that
// the request was wrong.
var unavailablePrefixes = []string{
	"LOADING", "BUSY", "MASTERDOWN", "READONLY", "CLUSTERDOWN", "TRYAGAIN",
	"NOAUTH", "WRONGPASS", "NOPERM", "NOREPLICAS", "OOM",
	"ERR max number of clients",
}

// unavailable tells failures of Redis from refusals of a request.
func unavailable(err error) bool {
	var rerr goredis.Error
	if !errors.As(err, &rerr) {
		// Not a reply: network, timeout, pool exhausted, client closed.
		return true
	}
	msg := rerr.Error()
	for _, p := range unavailablePrefixes {
		if strings.HasPrefix(msg, p) {
			return true
		}
	}
	return false
}
