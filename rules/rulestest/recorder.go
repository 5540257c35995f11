package rulestest

import (
	"context"

	"github.com/policyd-mail/policyd/rules"
)

// Recorder is a test rule with every hook of a session: each call goes to
// Answer, which sees the hook and the session and answers as a rule
// would. A test's probe is a Recorder and an Answer function, not eight
// methods written again. The answers of the reset and disconnect hooks
// are ignored, as the chain ignores them.
type Recorder struct {
	Answer func(h rules.Hook, s *rules.Session) (rules.Result, error)
}

var (
	_ rules.ConnectHook    = (*Recorder)(nil)
	_ rules.HeloHook       = (*Recorder)(nil)
	_ rules.MailHook       = (*Recorder)(nil)
	_ rules.RcptHook       = (*Recorder)(nil)
	_ rules.DataHook       = (*Recorder)(nil)
	_ rules.DataPostHook   = (*Recorder)(nil)
	_ rules.ResetHook      = (*Recorder)(nil)
	_ rules.DisconnectHook = (*Recorder)(nil)
)

func (r *Recorder) Connect(_ context.Context, s *rules.Session) (rules.Result, error) {
	return r.Answer(rules.HookConnect, s)
}

func (r *Recorder) Helo(_ context.Context, s *rules.Session) (rules.Result, error) {
	return r.Answer(rules.HookHelo, s)
}

func (r *Recorder) Mail(_ context.Context, s *rules.Session) (rules.Result, error) {
	return r.Answer(rules.HookMail, s)
}

func (r *Recorder) Rcpt(_ context.Context, s *rules.Session) (rules.Result, error) {
	return r.Answer(rules.HookRcpt, s)
}

func (r *Recorder) Data(_ context.Context, s *rules.Session) (rules.Result, error) {
	return r.Answer(rules.HookData, s)
}

func (r *Recorder) DataPost(_ context.Context, s *rules.Session) (rules.Result, error) {
	return r.Answer(rules.HookDataPost, s)
}

func (r *Recorder) ResetTransaction(_ context.Context, s *rules.Session) error {
	_, err := r.Answer(rules.HookResetTransaction, s)
	return err
}

func (r *Recorder) Disconnect(_ context.Context, s *rules.Session) error {
	_, err := r.Answer(rules.HookDisconnect, s)
	return err
}
