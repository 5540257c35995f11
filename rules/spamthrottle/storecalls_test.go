package spamthrottle_test

import (
	"context"
	"net/netip"
	"testing"
	"testing/fstest"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/rules/rulestest"
	"github.com/policyd-mail/policyd/store/memory"
)

// No hook makes more than one store round trip: the record is read at
// MAIL and written at DATA.
func TestStoreCallsPerHook(t *testing.T) {
	clock := rulestest.NewClock()
	mem := memory.New(memory.Options{Now: clock.Now, SweepInterval: -1})
	t.Cleanup(func() { mem.Close() })
	st := rulestest.NewCountingStore(mem)
	c, _, err := rules.Load(fstest.MapFS{"plugins": {Data: []byte("spamthrottle block \"198.51.100.0/24 st 0\"\n")}}, "config", rules.Options{Store: st, Clock: clock})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	calls := func(step string, want int64, f func()) { t.Helper(); st.Expect(t, step, want, f) }
	for _, tc := range []struct {
		ip         string
		mail, data int64
	}{{"192.0.2.1", 1, 1}, {"198.51.100.1", 0, 0}} {
		s := rules.NewConversation(c, "test", netipAddr(t, tc.ip), 40000, clock.Now())
		calls(tc.ip+" connect", 0, func() { s.Connect(ctx) })
		calls(tc.ip+" helo", 0, func() { s.Helo(ctx, "client.example") })
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
