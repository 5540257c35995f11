package hostsallow_test

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

// No hook makes more than one store round trip; most make none.
func TestStoreCallsPerHook(t *testing.T) {
	clock := rulestest.NewClock()
	mem := memory.New(memory.Options{Now: clock.Now, SweepInterval: -1})
	t.Cleanup(func() { mem.Close() })
	st := &counting{Store: mem}
	c, _, err := rules.Load(fstest.MapFS{"plugins": {Data: []byte("hosts_allow lease 60\n")}}, "config", rules.Options{Store: st, Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	s := rules.NewSession(c, "test", netipAddr(t, "192.0.2.1"), 40000, clock.Now())
	calls := func(step string, want int64, f func()) {
		t.Helper()
		before := st.n.Load()
		f()
		if got := st.n.Load() - before; got != want {
			t.Errorf("%s: %d store calls, want %d", step, got, want)
		}
	}
	calls("connect", 1, func() { s.Connect(ctx) })
	calls("helo", 0, func() { s.SayHelo(ctx, "client.example") })
	calls("mail", 0, func() { s.Mail(ctx, rules.MailFrom{Sender: "a@example.org"}) })
	calls("rcpt", 0, func() { s.Rcpt(ctx, "b@example.test") })
	calls("data", 0, func() { s.Data(ctx) })
	calls("data_post", 0, func() { s.DataPost(ctx) })
	clock.Advance(15 * time.Second)
	calls("mail after a quarter of the lease", 1, func() { s.Mail(ctx, rules.MailFrom{Sender: "a@example.org"}) })
	calls("rcpt right after", 0, func() { s.Rcpt(ctx, "b@example.test") })
	calls("disconnect", 1, func() { s.End(ctx) })
}

func netipAddr(t *testing.T, s string) netip.Addr {
	t.Helper()
	a, err := netip.ParseAddr(s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func BenchmarkSession(b *testing.B) {
	h := rulestest.New(b, "hosts_allow max_conn_ip 1000", nil)
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		s := h.Session("192.0.2.1")
		s.Connect(ctx)
		s.Mail(ctx, rules.MailFrom{Sender: "a@example.org"})
		s.Rcpt(ctx, "b@example.test")
		s.End(ctx)
	}
}
