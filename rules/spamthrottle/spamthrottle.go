// Package spamthrottle slows down clients that deliver fast (qmail's
// spamthrottle patch): after DATA the reply is held for a per-client delay
// that grows while the client sends faster than its delay and decays when
// it slows, between st and stmax milliseconds, with settings per IP block.
package spamthrottle

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"time"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/store"
)

func init() {
	// RawLines: the rule file may hold the seed's assignment lines
	// ("192.168.:dir:st:stmax:flush:rcpt:tg:tg_resp:"), which have no blank.
	rules.Register(rules.Definition{Name: "spamthrottle", Setup: setup, RawLines: true})
}

// Throttle is one spamthrottle instance.
type Throttle struct {
	name   string
	store  store.Store
	clock  rules.Clock
	log    *slog.Logger
	keys   store.Keys
	def    params
	blocks []*block // most specific first
	note   string   // transaction note carrying what Mail read to Data
}

var (
	_ rules.MailHook    = (*Throttle)(nil)
	_ rules.ClientKeyer = (*Throttle)(nil)
	_ rules.DataHook    = (*Throttle)(nil)
	_ rules.Delayer     = (*Throttle)(nil)
)

func setup(b *rules.Binder, env rules.Env) (any, error) {
	t := &Throttle{
		name:  env.Name,
		store: env.Store,
		clock: env.Clock,
		log:   env.Logger,
		keys:  store.NewKeys(env.Name, b.IPv6Prefix()),
		note:  env.Name + ":pending",
	}
	base := params{
		st:    ms(b.Int("st", 1000, 0, maxMS)),
		stmax: ms(b.Int("stmax", 8000, 0, maxMS)),
		rcpt:  b.Int("rcpt", 0, 0, maxRcpt),
	}
	var blocks []*block
	for _, l := range b.Lines() {
		if l.Value == "." {
			continue // qmail-spamt(5) ends the file with a lone dot
		}
		blk, warns, err := parseSeedLine(l.Value)
		if err != nil {
			b.ErrorAt(l, "%v", err)
			continue
		}
		blk.where = l.Pos.String()
		blk.fail = func(format string, args ...any) { b.ErrorAt(l, format, args...) }
		for _, w := range warns {
			b.Warnf("%s: %s", blk.where, w)
		}
		blocks = append(blocks, blk)
	}
	for _, v := range b.Strings("block") {
		blk, warns, err := parseBlock(v)
		if err != nil {
			b.Errorf("block %q: %v", v, err)
			continue
		}
		blk.where = fmt.Sprintf("block %q", v)
		blk.fail = func(format string, args ...any) { b.Errorf("block %q: "+format, append([]any{v}, args...)...) }
		for _, w := range warns {
			b.Warnf("%s: %s", blk.where, w)
		}
		blocks = append(blocks, blk)
	}
	if base.st > base.stmax {
		b.Errorf("st %d is above stmax %d", base.st.Milliseconds(), base.stmax.Milliseconds())
	}
	var warns []string
	t.def, t.blocks, warns = resolve(base, blocks)
	for _, w := range warns {
		b.Warnf("%s", w)
	}
	return t, nil
}

// paramsFor returns the settings of the most specific block holding a.
func (t *Throttle) paramsFor(a netip.Addr) (params, string) {
	for _, b := range t.blocks {
		if b.prefix.Contains(a) {
			return b.eff, b.name()
		}
	}
	return t.def, "default"
}

// pending is what Mail read for the transaction's Data.
type pending struct {
	key   string
	p     params
	block string
	rec   record
	found bool
}

// Mail reads the client's record, so that Data needs only one store call
// too.
func (t *Throttle) Mail(ctx context.Context, s *rules.Session) (rules.Result, error) {
	if s.Txn == nil || !s.Client.IsValid() || s.Whitelisted() {
		return rules.Result{}, nil
	}
	p, blk := t.paramsFor(s.Client)
	if p.st == 0 {
		return rules.Result{}, nil
	}
	key := t.keys.Client(s.Client, "pace")
	v, ok, err := t.store.Get(ctx, key)
	if err != nil {
		return rules.Result{}, fmt.Errorf("spamthrottle read %s: %w", key, err)
	}
	pd := &pending{key: key, p: p, block: blk}
	if ok {
		if pd.rec, pd.found = decode(v); !pd.found {
			t.log.Debug("unreadable record, starting over", "key", key)
		}
	}
	s.Txn.Notes.Set(t.note, pd)
	return rules.Result{}, nil
}

// Data works out the delay, stores the client's new record and asks the
// front-end to hold the reply that long. It never refuses.
func (t *Throttle) Data(ctx context.Context, s *rules.Session) (rules.Result, error) {
	if s.Txn == nil {
		return rules.Result{}, nil
	}
	pd, ok := s.Txn.Notes.Get(t.note).(*pending)
	if !ok {
		// Not throttled, or the mail hook did not run for this rule (an
		// earlier rule answered OK, or the store failed): no delay rather
		// than a guess that would overwrite the client's record.
		return rules.Result{}, nil
	}
	now := t.clock.Now()
	n := len(s.Txn.Rcpts)
	rec, hold := next(pd.rec, pd.found, now, pd.p, n)
	if err := t.store.Set(ctx, pd.key, rec.encode(), rec.ttl(now, pd.p)); err != nil {
		return rules.Result{}, fmt.Errorf("spamthrottle write %s: %w", pd.key, err)
	}
	t.log.Debug("delay", "client", s.Client.String(), "block", pd.block, "delay", hold, "pace", rec.pace, "recipients", n)
	return rules.Result{Delay: hold}, nil
}

// ClientKeys declares where the rule keeps its records (rules.ClientKeyer).
func (t *Throttle) ClientKeys() store.Keys { return t.keys }

// MaxDelay is the longest delay the rule may ask for (rules.Delayer):
// the largest stmax of the default and of every block.
func (t *Throttle) MaxDelay() time.Duration {
	d := t.def.stmax
	for _, b := range t.blocks {
		d = max(d, b.eff.stmax)
	}
	return d
}
