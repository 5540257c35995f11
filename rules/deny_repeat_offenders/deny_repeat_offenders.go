// Package denyrepeatoffenders tempfails clients that were refused too often
// lately, after the deny_repeat_offenders plugin of Matt Sergeant's
// "Using Qpsmtpd": the deny observer counts every DENY and DENY_DISCONNECT
// a client gets from the other rules, and the connect hook refuses it
// while the count is at the threshold.
package denyrepeatoffenders

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/store"
)

func init() {
	rules.Register(rules.Definition{Name: "deny_repeat_offenders", Setup: setup, Positional: positional})
}

// Text is the seed's reply.
const Text = "You are a repeat offender. Go away"

// Offenders keeps one record per client: how many refusals in a row (none
// more than reset apart) and when the last one was.
type Offenders struct {
	name      string
	store     store.Store
	clock     rules.Clock
	threshold int64
	reset     time.Duration
	window    time.Duration
	keys      store.Keys
	// perAnswer counts every refusal; by default a transaction counts
	// once, however many of its recipients were refused.
	perAnswer bool
	counted   string // transaction note: this transaction was counted
}

var (
	_ rules.ConnectHook   = (*Offenders)(nil)
	_ rules.ConnectReader = (*Offenders)(nil)
	_ rules.ClientKeyer   = (*Offenders)(nil)
	_ rules.DenyObserver  = (*Offenders)(nil)
)

// keys are the settings the rule reads; positional tells them from the
// seed's "FILE N" arguments.
var keys = []string{"threshold", "reset", "window", "count", "ipv6_prefix", "file", "dry_run", "code", "enhanced", "text"}

// positional accepts the seed's plugins line, "deny_repeat_offenders FILE
// N", as well as the usual "key value" pairs (which may follow FILE N).
// The file becomes the setting "file", which setup accepts with a warning.
func positional(args []string) ([]rules.Setting, error) {
	if len(args) == 0 || isKey(args[0]) {
		return rules.PairSettings(args)
	}
	out := []rules.Setting{{Key: "file", Value: args[0]}}
	rest := args[1:]
	if len(rest) > 0 && !isKey(rest[0]) {
		out = append(out, rules.Setting{Key: "threshold", Value: rest[0]})
		rest = rest[1:]
	}
	pairs, err := rules.PairSettings(rest)
	if err != nil {
		return nil, err
	}
	return append(out, pairs...), nil
}

func isKey(s string) bool { return slices.Contains(keys, s) }

func setup(b *rules.Binder, env rules.Env) (any, error) {
	o := &Offenders{
		name:      env.Name,
		store:     env.Store,
		clock:     env.Clock,
		threshold: b.Int("threshold", 5, 1, 1<<31),
		reset:     b.Duration("reset", 8*time.Hour, time.Second, 365*24*time.Hour),
		window:    b.Duration("window", 12*time.Hour, time.Second, 365*24*time.Hour),
		keys:      store.NewKeys(env.Name, b.IPv6Prefix()),
		counted:   env.Name + ":counted",
	}
	switch c := b.String("count", "transaction"); c {
	case "transaction":
	case "answer":
		o.perAnswer = true
	default:
		b.Errorf("count: %q is neither transaction (one per message) nor answer (one per refusal)", c)
	}
	b.Obsolete("file", "offender records live in policyd's store (--store)")
	return o, nil
}

func (o *Offenders) key(s *rules.Session) string {
	return o.keys.Client(s.Client, "offender")
}

// OnDeny counts a permanent refusal by another rule. The record starts
// over when the previous refusal is more than reset old, and expires
// window after the last one (or reset, if longer, so the count can go on).
func (o *Offenders) OnDeny(ctx context.Context, s *rules.Session, d rules.Decision) error {
	if (d.Code != rules.Deny && d.Code != rules.DenyDisconnect) || d.Rule == o.name || s.Whitelisted() {
		return nil
	}
	// A listed sender refused at each of five recipients is one refused
	// message, as qpsmtpd 0.94 refuses it once, at MAIL.
	once := !o.perAnswer && s.Txn != nil
	if once && s.Txn.Notes.Bool(o.counted) {
		return nil
	}
	key := o.key(s)
	if _, err := o.store.Tally(ctx, key, o.clock.Now(), o.reset, max(o.window, o.reset)); err != nil {
		return fmt.Errorf("deny_repeat_offenders tally %s: %w", key, err)
	}
	if once {
		s.Txn.Notes.Set(o.counted, true)
	}
	return nil
}

// Connect tempfails a client with threshold or more refusals, the last
// one less than window ago.
func (o *Offenders) Connect(ctx context.Context, s *rules.Session) (rules.Result, error) {
	if s.Whitelisted() {
		return rules.Result{}, nil
	}
	recs, ok, err := s.ReadAhead(ctx, o)
	if !ok {
		recs, err = o.store.HGet(ctx, o.key(s))
	}
	if err != nil {
		return rules.Result{}, fmt.Errorf("deny_repeat_offenders read the record of %s: %w", s.Client, err)
	}
	if len(recs) == 0 || recs[0] == nil {
		return rules.Result{}, nil
	}
	last := time.UnixMilli(recs[0][store.TallyLast])
	// The store's expiry removes stale records; this check covers a store
	// whose clock runs behind ours and a window shorter than reset.
	if o.clock.Now().Sub(last) >= o.window || recs[0][store.TallyCount] < o.threshold {
		return rules.Result{}, nil
	}
	return rules.Decided(rules.DenySoft, Text), nil
}

// ConnectReads declares Connect's read (rules.ConnectReader). The
// whitelist has not yet spoken when the chain asks: a whitelisted
// client's record is read and not used.
func (o *Offenders) ConnectReads(s *rules.Session) []string {
	if s.Whitelisted() {
		return nil
	}
	return []string{o.key(s)}
}

// ClientKeys declares where the rule keeps its records (rules.ClientKeyer).
func (o *Offenders) ClientKeys() store.Keys { return o.keys }

// Answers are the refusals the rule gives (rules.Answerer): it only
// defers, so a code override of the other class is reported at load.
func (o *Offenders) Answers() []rules.Code { return []rules.Code{rules.DenySoft} }
