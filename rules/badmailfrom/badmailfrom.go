// Package badmailfrom refuses mail from listed envelope senders, after
// qpsmtpd's check_badmailfrom: the sender is matched at MAIL and the
// refusal given at RCPT, since some clients do not take a refused MAIL
// well (RFC 5321 clients are expected to read a RCPT refusal).
package badmailfrom

import (
	"context"

	"github.com/policyd-mail/policyd/rules"
)

func init() {
	// RawLines: qpsmtpd's badmailfrom file, bare entries as they are.
	rules.Register(rules.Definition{Name: "badmailfrom", Setup: setup, RawLines: true})
}

// Note is the transaction note the mail hook leaves for the rcpt hook:
// the reason the sender is refused. Other rules may read it.
const Note = "badmailfrom"

// DefaultReason is qpsmtpd's text when an entry gives none.
const DefaultReason = "sorry, your envelope sender is in my badmailfrom list"

// BadMailFrom holds the listed senders.
type BadMailFrom struct {
	senders List
}

var (
	_ rules.MailHook = (*BadMailFrom)(nil)
	_ rules.RcptHook = (*BadMailFrom)(nil)
)

func setup(b *rules.Binder, _ rules.Env) (any, error) {
	return &BadMailFrom{senders: Load(b, "sender", "sender")}, nil
}

// Mail notes a listed sender; it never refuses by itself.
func (r *BadMailFrom) Mail(_ context.Context, s *rules.Session) (rules.Result, error) {
	if s.Txn == nil {
		return rules.Result{}, nil
	}
	if _, reason, ok := r.senders.Match(s.Txn.Sender); ok {
		if reason == "" {
			reason = DefaultReason
		}
		s.Txn.Notes.Set(Note, reason)
	}
	return rules.Result{}, nil
}

// Rcpt refuses every recipient of a transaction whose sender is listed.
func (r *BadMailFrom) Rcpt(_ context.Context, s *rules.Session) (rules.Result, error) {
	if s.Txn == nil {
		return rules.Result{}, nil
	}
	if reason, _ := s.Txn.Notes.Get(Note).(string); reason != "" {
		return rules.Decided(rules.Deny, reason), nil
	}
	return rules.Result{}, nil
}

// Answers are the refusals the rule gives (rules.Answerer): it only
// refuses for good, so a code override of the other class is reported at load.
func (r *BadMailFrom) Answers() []rules.Code { return []rules.Code{rules.Deny} }
