// Package whitelist marks sessions from trusted networks so that every
// throttling rule leaves them alone.
package whitelist

import (
	"context"

	"github.com/policyd-mail/policyd/rules"
)

func init() {
	rules.Register(rules.Definition{Name: "whitelist", Setup: setup, NeverRefuses: true, Early: true})
}

// Whitelist sets the connection note rules.NoteWhitelisted for clients in
// its list. It never refuses and never accepts on its own: the rules after
// it still run, and each throttling rule decides to skip.
type Whitelist struct {
	clients *rules.PrefixList
}

var _ rules.ConnectHook = (*Whitelist)(nil)

func setup(b *rules.Binder, _ rules.Env) (any, error) {
	return &Whitelist{clients: b.Prefixes("clients")}, nil
}

// Connect notes whether the client is trusted.
func (w *Whitelist) Connect(_ context.Context, s *rules.Session) (rules.Result, error) {
	if w.clients.Contains(s.Client) {
		s.Notes.Set(rules.NoteWhitelisted, true)
	}
	return rules.Result{}, nil
}
