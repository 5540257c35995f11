package denyrepeatoffenders

import (
	"context"
	"net/netip"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/rules/rulestest"
	"github.com/policyd-mail/policyd/store"
	"github.com/policyd-mail/policyd/store/memory"
)

// The rule only tempfails, but as in the seed it ignores refusals it gave
// itself, whatever their code, so it can never feed on its own answers.
func TestOwnRefusalsIgnored(t *testing.T) {
	clock := rulestest.NewClock()
	st := memory.New(memory.Options{Now: clock.Now, SweepInterval: -1})
	defer st.Close()
	o := &Offenders{name: "deny_repeat_offenders:1", store: st, clock: clock, threshold: 1,
		reset: 8 * time.Hour, window: 12 * time.Hour, keys: store.NewKeys("deny_repeat_offenders:1", 64)}
	s := rules.NewSession(nil, "test", netip.MustParseAddr("192.0.2.1"), 1, clock.Now())
	ctx := context.Background()
	key := store.Key("192.0.2.1", "deny_repeat_offenders:1", "offender")
	if err := o.OnDeny(ctx, s, rules.Decision{Rule: "deny_repeat_offenders:1", Code: rules.Deny}); err != nil {
		t.Fatal(err)
	}
	if recs, _ := st.HGet(ctx, key); recs[0] != nil {
		t.Fatalf("own refusal counted: %v", recs)
	}
	if err := o.OnDeny(ctx, s, rules.Decision{Rule: "deny_repeat_offenders:0", Code: rules.Deny}); err != nil {
		t.Fatal(err)
	}
	if recs, _ := st.HGet(ctx, key); recs[0][store.TallyCount] != 1 {
		t.Fatalf("another instance's refusal not counted: %v", recs)
	}
}
