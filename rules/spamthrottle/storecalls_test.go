package spamthrottle_test

import (
	"context"
	"net/netip"
	"sync/atomic"
	"testing"
	"testing/fstest"
	"time"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/rules/rulestest"
	"github.com/policyd-mail/policyd/store"
	"github.com/policyd-mail/policyd/store/memory"
)

// counting counts the store calls a rule makes.
type counting struct {
	store.Store
	n atomic.Int64
}

func (c *counting) Incr(ctx context.Context, key string, delta int64, ttl time.Duration) (int64, error) {
	c.n.Add(1)
	return c.Store.Incr(ctx, key, delta, ttl)
}

func (c *counting) Get(ctx context.Context, key string) ([]byte, bool, error) {
	c.n.Add(1)
	return c.Store.Get(ctx, key)
}

func (c *counting) Set(ctx context.Context, key string, value []byte, ttl time.Duration) error {
	c.n.Add(1)
	return c.Store.Set(ctx, key, value, ttl)
}

func (c *counting) SetNX(ctx context.Context, key string, value []byte, ttl time.Duration) (bool, []byte, error) {
	c.n.Add(1)
	return c.Store.SetNX(ctx, key, value, ttl)
}

func (c *counting) Delete(ctx context.Context, keys ...string) error {
	c.n.Add(1)
	return c.Store.Delete(ctx, keys...)
}

func (c *counting) HIncr(ctx context.Context, ttl time.Duration, incs ...store.FieldIncr) error {
	c.n.Add(1)
	return c.Store.HIncr(ctx, ttl, incs...)
}

func (c *counting) HGet(ctx context.Context, keys ...string) ([]map[string]int64, error) {
	c.n.Add(1)
	return c.Store.HGet(ctx, keys...)
}

func (c *counting) Tally(ctx context.Context, key string, now time.Time, quiet, ttl time.Duration) (int64, error) {
	c.n.Add(1)
	return c.Store.Tally(ctx, key, now, quiet, ttl)
}

func (c *counting) Acquire(ctx context.Context, key, member string, limit int64, now time.Time, lease time.Duration) (bool, int64, error) {
	c.n.Add(1)
	return c.Store.Acquire(ctx, key, member, limit, now, lease)
}

func (c *counting) Release(ctx context.Context, key, member string) error {
	c.n.Add(1)
	return c.Store.Release(ctx, key, member)
}

// No hook makes more than one store round trip: the record is read at
// MAIL and written at DATA.
func TestStoreCallsPerHook(t *testing.T) {
	clock := rulestest.NewClock()
	mem := memory.New(memory.Options{Now: clock.Now, SweepInterval: -1})
	t.Cleanup(func() { mem.Close() })
	st := &counting{Store: mem}
	c, _, err := rules.Load(fstest.MapFS{"plugins": {Data: []byte("spamthrottle block \"198.51.100.0/24 st 0\"\n")}}, "config", rules.Options{Store: st, Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	calls := func(step string, want int64, f func()) {
		t.Helper()
		before := st.n.Load()
		f()
		if got := st.n.Load() - before; got != want {
			t.Errorf("%s: %d store calls, want %d", step, got, want)
		}
	}
	for _, tc := range []struct {
		ip         string
		mail, data int64
	}{{"192.0.2.1", 1, 1}, {"198.51.100.1", 0, 0}} {
		s := rules.NewSession(c, "test", netipAddr(t, tc.ip), 40000, clock.Now())
		calls(tc.ip+" connect", 0, func() { s.Connect(ctx) })
		calls(tc.ip+" helo", 0, func() { s.SayHelo(ctx, "client.example") })
		for range 2 {
			calls(tc.ip+" mail", tc.mail, func() { s.Mail(ctx, rules.MailFrom{Sender: "a@example.org"}) })
			calls(tc.ip+" rcpt", 0, func() { s.Rcpt(ctx, "b@example.test") })
			calls(tc.ip+" rcpt", 0, func() { s.Rcpt(ctx, "c@example.test") })
			calls(tc.ip+" data", tc.data, func() { s.Data(ctx) })
			calls(tc.ip+" data_post", 0, func() { s.DataPost(ctx) })
		}
		calls(tc.ip+" disconnect", 0, func() { s.End(ctx) })
	}
}

func netipAddr(t *testing.T, s string) netip.Addr {
	t.Helper()
	a, err := netip.ParseAddr(s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}
