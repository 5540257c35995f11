package hostsallow_test

import (
	"context"
	"net/netip"
	"testing"
	"testing/fstest"
	"time"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/rules/rulestest"
	"github.com/policyd-mail/policyd/store/memory"
)

// No hook makes more than one store round trip; most make none.
func TestStoreCallsPerHook(t *testing.T) {
	clock := rulestest.NewClock()
	mem := memory.New(memory.Options{Now: clock.Now, SweepInterval: -1})
	t.Cleanup(func() { mem.Close() })
	st := rulestest.NewCountingStore(mem)
	c, _, err := rules.Load(fstest.MapFS{"plugins": {Data: []byte("hosts_allow lease 60\n")}}, "config", rules.Options{Store: st, Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	s := rules.NewConversation(c, "test", netipAddr(t, "192.0.2.1"), 40000, clock.Now())
	calls := func(step string, want int64, f func()) { t.Helper(); st.Expect(t, step, want, f) }
	calls("connect", 1, func() { s.Connect(ctx) })
	calls("helo", 0, func() { s.Helo(ctx, "client.example") })
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
