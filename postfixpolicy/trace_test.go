package postfixpolicy_test

import (
	"strings"
	"sync"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/rules/rulestest"
)

// trace is a test rule that records every hook it is asked, and refuses
// at the hooks named in its settings: "deny mail" or "denysoft data" —
// with the sender or recipient in the text, so a dialogue shows which
// one a refusal was about.
type trace struct {
	deny, denysoft string
}

var (
	traceMu  sync.Mutex
	traceLog []string
)

func takeTrace() string {
	traceMu.Lock()
	defer traceMu.Unlock()
	out := strings.Join(traceLog, " ")
	traceLog = nil
	return out
}

func init() {
	rules.Register(rules.Definition{Name: "trace", Setup: func(b *rules.Binder, _ rules.Env) (any, error) {
		t := &trace{deny: b.String("deny", ""), denysoft: b.String("denysoft", "")}
		return &rulestest.Recorder{Answer: t.hook}, nil
	}})
}

func (t *trace) hook(h rules.Hook, s *rules.Session) (rules.Result, error) {
	traceMu.Lock()
	traceLog = append(traceLog, h.String())
	traceMu.Unlock()
	what := ""
	if s.Txn != nil {
		what = s.Txn.Sender + ">" + s.Txn.Rcpt
	}
	switch h.String() {
	case t.deny:
		return rules.Decided(rules.Deny, "no "+what), nil
	case t.denysoft:
		return rules.Decided(rules.DenySoft, "later "+what), nil
	}
	return rules.Result{}, nil
}
