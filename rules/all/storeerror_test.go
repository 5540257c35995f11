package all_test

import (
	"testing"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/rules/rulestest"
	"github.com/policyd-mail/policyd/store/memory"
)

// --on-store-error tempfail with the store down: a rule that never
// refuses (client_stats) does not refuse for its failed read, and a
// whitelisted client is exempt; a rule that refuses still tempfails the
// others. Before, a whitelisted client was refused during a Redis outage.
func TestStoreErrorPolicyExemptions(t *testing.T) {
	down := memory.New(memory.Options{SweepInterval: -1})
	down.Close() // every call now fails with store.ErrUnavailable
	for _, tc := range []struct {
		name, plugins, client string
		want                  rules.Code
	}{
		{"a rule that never refuses", "client_stats", "192.0.2.1", rules.Declined},
		{"a whitelisted client", "whitelist clients 192.0.2.1\nclient_stats\nconnection_shaper threshold 5", "192.0.2.1", rules.Declined},
		{"anyone else", "whitelist clients 192.0.2.1\nclient_stats\nconnection_shaper threshold 5", "192.0.2.2", rules.DenySoft},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h := rulestest.NewWith(t, tc.plugins, nil, rulestest.Options{Store: down, OnStoreError: rules.FailTempfail})
			if _, d := h.Connect(tc.client); d.Code != tc.want {
				t.Errorf("connect from %s: %v (%s, rule %s), want %v", tc.client, d.Code, d.Text, d.Rule, tc.want)
			}
		})
	}
}
