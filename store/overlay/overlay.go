// Package overlay is a store.Store that reads another store and writes
// only to memory of its own: what `policyd simulate` runs on, so that
// trying a client against the daemon's Redis shows what its rules would
// do with the real counters and records, and changes none of them.
//
// A key is copied from the base store the first time an operation writes
// it (its value, fields or leases, and its expiry); from then on it lives
// in the overlay. Reads of keys never written go to the base store.
package overlay

import (
	"context"
	"fmt"
	"math"
	"slices"
	"sync"
	"time"

	"github.com/policyd-mail/policyd/store"
	"github.com/policyd-mail/policyd/store/memory"
)

// Store is the overlay.
type Store struct {
	base store.Store
	mem  *memory.Store
	now  func() time.Time
	mu   sync.Mutex
	// own lists the keys the overlay holds the truth of: copied, set or
	// deleted here (a deleted key is owned and absent).
	own map[string]bool
}

var _ store.Store = (*Store)(nil)

// New returns an overlay on base; now is its clock for expiry (nil:
// time.Now), which should be the base's. Close closes both.
func New(base store.Store, now func() time.Time) *Store {
	if now == nil {
		now = time.Now
	}
	return &Store{base: base, mem: memory.New(memory.Options{SweepInterval: -1, Now: now}), now: now, own: map[string]bool{}}
}

// seed makes the overlay the owner of keys, copying each from the base
// store the first time.
func (s *Store) seed(ctx context.Context, keys ...string) error {
	for _, k := range keys {
		s.mu.Lock()
		owned := s.own[k]
		s.own[k] = true
		s.mu.Unlock()
		if owned {
			continue
		}
		if err := s.copyKey(ctx, k); err != nil {
			s.mu.Lock()
			delete(s.own, k)
			s.mu.Unlock()
			return err
		}
	}
	return nil
}

func (s *Store) copyKey(ctx context.Context, k string) error {
	e, ok, err := s.base.Inspect(ctx, k)
	if err != nil || !ok {
		return err
	}
	switch e.Kind {
	case store.KindString:
		return s.mem.Set(ctx, k, e.Value, e.TTL)
	case store.KindHash:
		var incs []store.FieldIncr
		for f, v := range e.Fields {
			incs = append(incs, store.FieldIncr{Key: k, Field: f, Delta: v})
		}
		return s.mem.HIncr(ctx, e.TTL, incs...)
	case store.KindLeases:
		now := s.now()
		for member, expiry := range e.Fields {
			if lease := time.UnixMilli(expiry).Sub(now); lease > 0 {
				if _, _, err := s.mem.Acquire(ctx, k, member, math.MaxInt64, now, lease); err != nil {
					return err
				}
			}
		}
		return nil
	}
	return fmt.Errorf("overlay: %s holds an unknown kind %q", k, e.Kind)
}

func (s *Store) owned(k string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.own[k]
}

func (s *Store) Incr(ctx context.Context, key string, delta int64, ttl time.Duration) (int64, error) {
	if err := s.seed(ctx, key); err != nil {
		return 0, err
	}
	return s.mem.Incr(ctx, key, delta, ttl)
}

func (s *Store) Get(ctx context.Context, key string) ([]byte, bool, error) {
	if s.owned(key) {
		return s.mem.Get(ctx, key)
	}
	return s.base.Get(ctx, key)
}

func (s *Store) Set(ctx context.Context, key string, value []byte, ttl time.Duration) error {
	// Set replaces value and expiry: nothing of the base's to copy.
	s.mu.Lock()
	s.own[key] = true
	s.mu.Unlock()
	return s.mem.Set(ctx, key, value, ttl)
}

func (s *Store) SetNX(ctx context.Context, key string, value []byte, ttl time.Duration) (bool, []byte, error) {
	if err := s.seed(ctx, key); err != nil {
		return false, nil, err
	}
	return s.mem.SetNX(ctx, key, value, ttl)
}

func (s *Store) Delete(ctx context.Context, keys ...string) error {
	s.mu.Lock()
	for _, k := range keys {
		s.own[k] = true
	}
	s.mu.Unlock()
	return s.mem.Delete(ctx, keys...)
}

func (s *Store) HIncr(ctx context.Context, ttl time.Duration, incs ...store.FieldIncr) error {
	keys := make([]string, len(incs))
	for i, in := range incs {
		keys[i] = in.Key
	}
	if err := store.SameTag(keys...); err != nil {
		return fmt.Errorf("overlay hincr: %w", err)
	}
	if err := s.seed(ctx, keys...); err != nil {
		return err
	}
	return s.mem.HIncr(ctx, ttl, incs...)
}

func (s *Store) HGet(ctx context.Context, keys ...string) ([]map[string]int64, error) {
	if err := store.SameTag(keys...); err != nil {
		return nil, fmt.Errorf("overlay hget: %w", err)
	}
	if err := s.seed(ctx, keys...); err != nil {
		return nil, err
	}
	return s.mem.HGet(ctx, keys...)
}

func (s *Store) Tally(ctx context.Context, key string, now time.Time, quiet, ttl time.Duration) (int64, error) {
	if err := s.seed(ctx, key); err != nil {
		return 0, err
	}
	return s.mem.Tally(ctx, key, now, quiet, ttl)
}

func (s *Store) Limit(ctx context.Context, key string, now time.Time, rates ...store.Rate) (bool, []int64, error) {
	if err := s.seed(ctx, key); err != nil {
		return false, nil, err
	}
	return s.mem.Limit(ctx, key, now, rates...)
}

func (s *Store) Acquire(ctx context.Context, key, member string, limit int64, now time.Time, lease time.Duration) (bool, int64, error) {
	if err := s.seed(ctx, key); err != nil {
		return false, 0, err
	}
	return s.mem.Acquire(ctx, key, member, limit, now, lease)
}

func (s *Store) Release(ctx context.Context, key, member string) error {
	if err := s.seed(ctx, key); err != nil {
		return err
	}
	return s.mem.Release(ctx, key, member)
}

// Scan lists the base's keys the overlay does not own, and the overlay's.
func (s *Store) Scan(ctx context.Context, prefix string) ([]string, error) {
	base, err := s.base.Scan(ctx, prefix)
	if err != nil {
		return nil, err
	}
	mine, err := s.mem.Scan(ctx, prefix)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	out := mine
	for _, k := range base {
		if !s.own[k] {
			out = append(out, k)
		}
	}
	s.mu.Unlock()
	slices.Sort(out)
	return slices.Compact(out), nil
}

func (s *Store) Inspect(ctx context.Context, key string) (store.Entry, bool, error) {
	if s.owned(key) {
		return s.mem.Inspect(ctx, key)
	}
	return s.base.Inspect(ctx, key)
}

// Close closes the overlay and the base store.
func (s *Store) Close() error {
	s.mem.Close()
	return s.base.Close()
}
