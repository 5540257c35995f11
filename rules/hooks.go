package rules

import (
	"context"
	"log/slog"
	"time"

	"github.com/policyd-mail/policyd/store"
)

// A rule implements only the hooks it uses; the chain finds them by type
// assertion when it is built. A rule returns an error only when it could
// not decide (store down, timeout): the engine, not the rule, then applies
// the fail-open or tempfail policy.

// ConnectHook runs when a client connects.
type ConnectHook interface {
	Connect(ctx context.Context, s *Session) (Result, error)
}

// HeloHook runs after HELO/EHLO; s.Helo holds the name.
type HeloHook interface {
	Helo(ctx context.Context, s *Session) (Result, error)
}

// MailHook runs after MAIL FROM; s.Txn.Sender holds the address.
type MailHook interface {
	Mail(ctx context.Context, s *Session) (Result, error)
}

// RcptHook runs once per recipient; s.Txn.Rcpt holds it.
type RcptHook interface {
	Rcpt(ctx context.Context, s *Session) (Result, error)
}

// DataHook runs when the message content starts.
type DataHook interface {
	Data(ctx context.Context, s *Session) (Result, error)
}

// DataPostHook runs after the end of the message.
type DataPostHook interface {
	DataPost(ctx context.Context, s *Session) (Result, error)
}

// ResetHook runs when a transaction ends (after a message, RSET, abort).
// Its answer is ignored.
type ResetHook interface {
	ResetTransaction(ctx context.Context, s *Session) error
}

// DisconnectHook runs when the session ends. Its answer is ignored.
type DisconnectHook interface {
	Disconnect(ctx context.Context, s *Session) error
}

// DenyObserver runs after any hook answered DENY*, with that decision
// (including the deciding rule's name, so a rule can ignore its own).
type DenyObserver interface {
	OnDeny(ctx context.Context, s *Session, d Decision) error
}

// OKObserver runs after any hook answered OK or DONE.
type OKObserver interface {
	OnOK(ctx context.Context, s *Session, d Decision) error
}

// Clock gives rules the time; tests inject a fake one.
type Clock interface {
	Now() time.Time
}

// SystemClock is the real clock.
type SystemClock struct{}

// Now returns time.Now().
func (SystemClock) Now() time.Time { return time.Now() }

// Env is what a rule gets when it is built.
type Env struct {
	Name   string // instance name: "connection_shaper" or "connection_shaper:1"
	Store  store.Store
	Clock  Clock
	Logger *slog.Logger // already scoped with rule=<Name>
	// Metrics counts the rule's own events (RuleEvent); never nil.
	Metrics Metrics
}
