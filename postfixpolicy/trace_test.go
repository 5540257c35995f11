package postfixpolicy_test

import (
	"context"
	"strings"
	"sync"

	"github.com/policyd-mail/policyd/rules"
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
		return &trace{deny: b.String("deny", ""), denysoft: b.String("denysoft", "")}, nil
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

func (t *trace) Connect(_ context.Context, s *rules.Session) (rules.Result, error) {
	return t.hook(rules.HookConnect, s)
}
func (t *trace) Helo(_ context.Context, s *rules.Session) (rules.Result, error) {
	return t.hook(rules.HookHelo, s)
}
func (t *trace) Mail(_ context.Context, s *rules.Session) (rules.Result, error) {
	return t.hook(rules.HookMail, s)
}
func (t *trace) Rcpt(_ context.Context, s *rules.Session) (rules.Result, error) {
	return t.hook(rules.HookRcpt, s)
}
func (t *trace) Data(_ context.Context, s *rules.Session) (rules.Result, error) {
	return t.hook(rules.HookData, s)
}
func (t *trace) DataPost(_ context.Context, s *rules.Session) (rules.Result, error) {
	return t.hook(rules.HookDataPost, s)
}
func (t *trace) ResetTransaction(_ context.Context, s *rules.Session) error {
	_, err := t.hook(rules.HookResetTransaction, s)
	return err
}
func (t *trace) Disconnect(_ context.Context, s *rules.Session) error {
	_, err := t.hook(rules.HookDisconnect, s)
	return err
}
