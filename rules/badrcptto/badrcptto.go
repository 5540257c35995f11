// Package badrcptto refuses listed envelope recipients, after qpsmtpd's
// check_badrcptto.
package badrcptto

import (
	"context"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/rules/badmailfrom"
)

func init() {
	// RawLines: qpsmtpd's badrcptto file, bare entries as they are.
	rules.Register(rules.Definition{Name: "badrcptto", Setup: setup, RawLines: true})
}

// BadRcptTo holds the listed recipients.
type BadRcptTo struct {
	rcpts badmailfrom.List
}

var _ rules.RcptHook = (*BadRcptTo)(nil)

func setup(b *rules.Binder, _ rules.Env) (any, error) {
	return &BadRcptTo{rcpts: badmailfrom.Load(b, "recipient", "recipient")}, nil
}

// Rcpt refuses a listed recipient, with the entry's reason or qpsmtpd's
// "mail to <entry> not accepted here".
func (r *BadRcptTo) Rcpt(_ context.Context, s *rules.Session) (rules.Result, error) {
	if s.Txn == nil {
		return rules.Result{}, nil
	}
	entry, reason, ok := r.rcpts.Match(s.Txn.Rcpt)
	if !ok {
		return rules.Result{}, nil
	}
	if reason == "" {
		reason = "mail to " + entry + " not accepted here"
	}
	return rules.Decided(rules.Deny, reason), nil
}

// Answers are the refusals the rule gives (rules.Answerer): it only
// refuses for good, so a code override of the other class is reported at load.
func (r *BadRcptTo) Answers() []rules.Code { return []rules.Code{rules.Deny} }
