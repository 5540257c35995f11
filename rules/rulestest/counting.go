package rulestest

import (
	"context"
	"maps"
	"sync"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/store"
)

// CountingStore counts the calls made to the store it wraps, per
// operation: on Redis each is one round trip, so a rule's test can show
// it makes at most one per hook.
type CountingStore struct {
	store.Store
	mu    sync.Mutex
	calls map[string]int64
}

// NewCountingStore wraps st.
func NewCountingStore(st store.Store) *CountingStore {
	return &CountingStore{Store: st, calls: map[string]int64{}}
}

func (c *CountingStore) count(op string) {
	c.mu.Lock()
	c.calls[op]++
	c.mu.Unlock()
}

// Calls returns the calls so far, by operation name ("HGet", "Incr").
func (c *CountingStore) Calls() map[string]int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.calls)
}

// Total is the number of calls so far.
func (c *CountingStore) Total() int64 {
	var n int64
	for _, v := range c.Calls() {
		n += v
	}
	return n
}

// Expect fails t unless f makes exactly want store calls.
func (c *CountingStore) Expect(t testing.TB, step string, want int64, f func()) {
	t.Helper()
	before := c.Total()
	f()
	if got := c.Total() - before; got != want {
		t.Errorf("%s: %d store calls, want %d", step, got, want)
	}
}

func (c *CountingStore) Incr(ctx context.Context, key string, delta int64, ttl time.Duration) (int64, error) {
	c.count("Incr")
	return c.Store.Incr(ctx, key, delta, ttl)
}

func (c *CountingStore) Get(ctx context.Context, key string) ([]byte, bool, error) {
	c.count("Get")
	return c.Store.Get(ctx, key)
}

func (c *CountingStore) Set(ctx context.Context, key string, value []byte, ttl time.Duration) error {
	c.count("Set")
	return c.Store.Set(ctx, key, value, ttl)
}

func (c *CountingStore) SetNX(ctx context.Context, key string, value []byte, ttl time.Duration) (bool, []byte, error) {
	c.count("SetNX")
	return c.Store.SetNX(ctx, key, value, ttl)
}

func (c *CountingStore) Delete(ctx context.Context, keys ...string) error {
	c.count("Delete")
	return c.Store.Delete(ctx, keys...)
}

func (c *CountingStore) HIncr(ctx context.Context, ttl time.Duration, incs ...store.FieldIncr) error {
	c.count("HIncr")
	return c.Store.HIncr(ctx, ttl, incs...)
}

func (c *CountingStore) HGet(ctx context.Context, keys ...string) ([]map[string]int64, error) {
	c.count("HGet")
	return c.Store.HGet(ctx, keys...)
}

func (c *CountingStore) Tally(ctx context.Context, key string, now time.Time, quiet, ttl time.Duration) (int64, error) {
	c.count("Tally")
	return c.Store.Tally(ctx, key, now, quiet, ttl)
}

func (c *CountingStore) Limit(ctx context.Context, key string, now time.Time, rates ...store.Rate) (bool, []int64, error) {
	c.count("Limit")
	return c.Store.Limit(ctx, key, now, rates...)
}

func (c *CountingStore) Acquire(ctx context.Context, key, member string, limit int64, now time.Time, lease time.Duration) (bool, int64, error) {
	c.count("Acquire")
	return c.Store.Acquire(ctx, key, member, limit, now, lease)
}

func (c *CountingStore) Release(ctx context.Context, key, member string) error {
	c.count("Release")
	return c.Store.Release(ctx, key, member)
}
