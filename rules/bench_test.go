package rules_test

import (
	"net/netip"
	"testing"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/store/memory"
)

// The connect hook of the built-in chain (whitelist, connection_shaper)
// for a client that is not whitelisted: one store increment.
func BenchmarkRunDefaultChain(b *testing.B) {
	st := memory.New(memory.Options{})
	defer st.Close()
	c, _, err := rules.Load(rules.DefaultConfig(), "(built-in)", rules.Options{Store: st})
	if err != nil {
		b.Fatal(err)
	}
	s := rules.NewConversation(c, "bench", mustAddr("192.0.2.1"), 1, c.Now())
	b.ReportAllocs()
	for b.Loop() {
		c.Run(b.Context(), rules.HookConnect, s.Session)
	}
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }
