// Package connectionshaper limits how many SMTP sessions one client may
// open within a time window (qpsmtpd's connection_shaper).
package connectionshaper

import (
	"context"
	"fmt"
	"time"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/store"
)

func init() {
	rules.Register(rules.Definition{Name: "connection_shaper", Setup: setup})
}

// Shaper counts sessions per client in a fixed window that starts with the
// client's first session, as the seed's memcached add+incr did.
type Shaper struct {
	name      string
	store     store.Store
	exptime   time.Duration
	threshold int64
	whitelist *rules.PrefixList
	keys      store.Keys
	text      string
}

var _ rules.ConnectHook = (*Shaper)(nil)
var _ rules.ClientKeyer = (*Shaper)(nil)

func setup(b *rules.Binder, env rules.Env) (any, error) {
	s := &Shaper{
		name:      env.Name,
		store:     env.Store,
		exptime:   b.Duration("exptime", 60*time.Second, time.Second, 7*24*time.Hour),
		threshold: b.Int("threshold", 10, 1, 1<<31),
		whitelist: b.Prefixes("whitelist"),
		keys:      store.NewKeys(env.Name, b.IPv6Prefix()),
	}
	b.Obsolete("memcached_server", "counters live in policyd's store (--store)")
	b.Obsolete("memcached_port", "counters live in policyd's store (--store)")
	s.text = fmt.Sprintf("Too many connections from your address (more than %d in %s), please try again later",
		s.threshold, s.exptime)
	return s, nil
}

// Connect counts this session and refuses it past the threshold.
func (c *Shaper) Connect(ctx context.Context, s *rules.Session) (rules.Result, error) {
	if s.Whitelisted() || c.whitelist.Contains(s.Client) {
		return rules.Result{}, nil
	}
	key := c.keys.Client(s.Client, "sessions")
	n, err := c.store.Incr(ctx, key, 1, c.exptime)
	if err != nil {
		return rules.Result{}, fmt.Errorf("connection_shaper count %s: %w", key, err)
	}
	if n > c.threshold {
		return rules.Decided(rules.DenySoft, c.text), nil
	}
	return rules.Result{}, nil
}

// ClientKeys declares where the rule keeps its records (rules.ClientKeyer).
func (s *Shaper) ClientKeys() store.Keys { return s.keys }

// Answers are the refusals the rule gives (rules.Answerer): it only
// defers, so a code override of the other class is reported at load.
func (c *Shaper) Answers() []rules.Code { return []rules.Code{rules.DenySoft} }
