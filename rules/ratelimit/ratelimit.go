// Package ratelimit limits the messages, recipients and bytes a value of
// a session attribute may send per time window: a SASL login, a sender,
// a domain, a client. A phished account stops at its budget instead of
// sending 50 000 spams in an hour. Budgets are GCRA (store.Rate), kept in
// one store record per value, checked and taken in one store call.
package ratelimit

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"time"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/store"
)

func init() {
	rules.Register(rules.Definition{Name: "ratelimit", Setup: setup})
}

// Attributes a key can be made of.
var attributes = []string{"sasl_username", "sender", "sender_domain", "recipient", "recipient_domain", "client", "client_network", "helo"}

// Limiter is one instance of the rule.
type Limiter struct {
	name      string
	store     store.Store
	clock     rules.Clock
	log       *slog.Logger
	metrics   rules.Metrics
	keys      store.Keys
	attrs     []string
	perRcpt   bool // a recipient attribute is part of the key
	budgets   budgets
	exact     map[string]budgets // overrides by value (lower case, comma-joined)
	domains   map[string]budgets // overrides by "@domain"
	v4bits    int
	v6bits    int
	whitelist bool // skip sessions the whitelist rule marked
	note      string
}

var (
	_ rules.RcptHook        = (*Limiter)(nil)
	_ rules.DataPostHook    = (*Limiter)(nil)
	_ rules.Answerer        = (*Limiter)(nil)
	_ rules.RecordDescriber = (*Limiter)(nil)
)

func setup(b *rules.Binder, env rules.Env) (any, error) {
	l := &Limiter{
		name:      env.Name,
		store:     env.Store,
		clock:     env.Clock,
		log:       env.Logger,
		metrics:   env.Metrics,
		v4bits:    int(b.Int("ipv4_prefix", 24, 8, 32)),
		v6bits:    b.IPv6Prefix(),
		whitelist: b.Bool("skip_whitelisted", true),
		note:      env.Name + ":counted",
		exact:     map[string]budgets{},
		domains:   map[string]budgets{},
	}
	l.keys = store.NewKeys(env.Name, l.v6bits)
	key := b.String("key", "")
	seen := map[string]bool{}
	for _, a := range strings.Split(key, ",") {
		a = strings.TrimSpace(a)
		switch {
		case key == "":
		case !contains(attributes, a):
			b.Errorf("key: %q is not one of %s", a, strings.Join(attributes, ", "))
		case seen[a]:
			b.Errorf("key: %s is listed twice", a)
		default:
			seen[a] = true
			l.attrs = append(l.attrs, a)
			l.perRcpt = l.perRcpt || a == "recipient" || a == "recipient_domain"
		}
	}
	if key == "" {
		b.Errorf("key: missing: what to limit by (%s, or a comma list of them)", strings.Join(attributes, ", "))
	}
	bad := false
	for i, kind := range kinds {
		if v := b.String(kind, ""); v != "" {
			bud, err := parseBudget(kind, v)
			if err != nil {
				b.Errorf("%v", err)
				bad = true
				continue
			}
			l.budgets[i] = bud
		}
	}
	for _, set := range b.Each("limit") {
		value, o, err := parseOverride(set.Value, len(l.attrs))
		if err != nil {
			b.ErrorAt(set, "%v", err)
			continue
		}
		if strings.HasPrefix(value, "@") {
			l.domains[value] = o
		} else {
			l.exact[value] = o
		}
	}
	if !bad && !l.budgets.any() && len(l.exact)+len(l.domains) == 0 {
		b.Errorf("no budget: give messages, recipients or bytes (like messages 100/1h)")
	}
	return l, nil
}

// parseOverride reads "VALUE BUDGET…" of a limit line: "unlimited", or
// kind/budget pairs.
func parseOverride(v string, nattrs int) (string, budgets, error) {
	f := strings.Fields(v)
	var o budgets
	if len(f) < 2 {
		return "", o, fmt.Errorf(`want "limit VALUE unlimited" or "limit VALUE messages N/DURATION …"`)
	}
	value := strings.ToLower(f[0])
	if strings.HasPrefix(value, "@") && (len(value) == 1 || strings.Contains(value[1:], "@") || strings.Contains(value, ",")) {
		return "", o, fmt.Errorf("%q is not @domain", f[0])
	}
	if !strings.HasPrefix(value, "@") && strings.Count(value, ",") != nattrs-1 {
		return "", o, fmt.Errorf("%q has %d parts; the key has %d (comma-joined, in the key's order)", f[0], strings.Count(value, ",")+1, nattrs)
	}
	if len(f) == 2 && f[1] == "unlimited" {
		for i, k := range kinds {
			o[i] = &budget{kind: k, unlimited: true}
		}
		return value, o, nil
	}
	if len(f)%2 != 1 {
		return "", o, fmt.Errorf("budgets come in pairs, like messages 100/1h: %q", strings.Join(f[1:], " "))
	}
	for i := 1; i < len(f); i += 2 {
		k := kindIndex(f[i])
		if k < 0 {
			return "", o, fmt.Errorf("unknown budget %q: messages, recipients or bytes", f[i])
		}
		bud, err := parseBudget(f[i], f[i+1])
		if err != nil {
			return "", o, err
		}
		o[k] = bud
	}
	return value, o, nil
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// Answers are the refusals the rule gives (rules.Answerer).
func (l *Limiter) Answers() []rules.Code { return []rules.Code{rules.DenySoft} }

// value is the key's value for s and recipient rcpt, its parts lower
// case; ok is false when the session lacks one of the attributes.
func (l *Limiter) value(s *rules.Session, rcpt string) ([]string, bool) {
	parts := make([]string, len(l.attrs))
	for i, a := range l.attrs {
		var v string
		switch a {
		case "sasl_username":
			v = s.AuthUser
		case "sender":
			if s.Txn != nil {
				v = address(s.Txn.Sender)
			}
		case "sender_domain":
			if s.Txn != nil {
				v = domain(address(s.Txn.Sender))
			}
		case "recipient":
			v = address(rcpt)
		case "recipient_domain":
			v = domain(address(rcpt))
		case "client":
			if s.Client.IsValid() {
				v = clientText(store.ClientNet(s.Client, l.v6bits))
			}
		case "client_network":
			if s.Client.IsValid() {
				bits := l.v6bits
				if s.Client.Unmap().Is4() {
					bits = l.v4bits
				}
				p, _ := s.Client.Unmap().Prefix(bits)
				v = p.String()
			}
		case "helo":
			v = s.Helo
		}
		v = strings.ToLower(strings.TrimSpace(v))
		if v == "" {
			return nil, false
		}
		parts[i] = v
	}
	return parts, true
}

// clientText is a client as a key value: an IPv4 address as it is, an
// IPv6 client as its network.
func clientText(p netip.Prefix) string {
	if p.Addr().Is4() {
		return p.Addr().String()
	}
	return p.String()
}

// address is an envelope address without angle brackets; "" for the
// null sender.
func address(a string) string {
	return strings.TrimSuffix(strings.TrimPrefix(strings.TrimSpace(a), "<"), ">")
}

// domain is the part of an address after its last @, "" without one.
func domain(a string) string {
	at := strings.LastIndexByte(a, '@')
	if at < 0 {
		return ""
	}
	return a[at+1:]
}

// budgetsFor are the budgets of a value: the instance's, with an exact
// override's kinds, else a domain override's (an exact value wins).
func (l *Limiter) budgetsFor(joined string, parts []string) budgets {
	if o, ok := l.exact[joined]; ok {
		return l.budgets.with(o)
	}
	if len(l.domains) > 0 {
		if d := domain(parts[0]); d != "" {
			if o, ok := l.domains["@"+d]; ok {
				return l.budgets.with(o)
			}
		}
	}
	return l.budgets
}

// recordKey is "policyd:{ATTR=VALUE}:NAME:rate[:ATTR=VALUE…]": the first
// part is the hash tag, so a value's record has one Redis Cluster slot
// and inspect finds it by that value.
func (l *Limiter) recordKey(parts []string) string {
	words := make([]string, 0, len(parts))
	words = append(words, "rate")
	for i := 1; i < len(parts); i++ {
		words = append(words, store.ValueSeg(l.attrs[i], parts[i]))
	}
	return l.keys.Value(l.attrs[0], parts[0], words...)
}

// counted is what a transaction has taken per value: whether its message
// was counted, and the bytes.
type counted map[string]int64

func (l *Limiter) counted(s *rules.Session) counted {
	if c, ok := s.Txn.Notes.Get(l.note).(counted); ok {
		return c
	}
	c := counted{}
	s.Txn.Notes.Set(l.note, c)
	return c
}

func (l *Limiter) skip(s *rules.Session) bool {
	return s.Txn == nil || l.whitelist && s.Whitelisted()
}

// Rcpt takes a recipient, and the message at its first recipient of a
// value (with the SIZE= hint's bytes, when the MTA gave one), from the
// value's budgets.
func (l *Limiter) Rcpt(ctx context.Context, s *rules.Session) (rules.Result, error) {
	if l.skip(s) {
		return rules.Result{}, nil
	}
	parts, ok := l.value(s, s.Txn.Rcpt)
	if !ok {
		return rules.Result{}, nil
	}
	joined := strings.Join(parts, ",")
	c := l.counted(s)
	var costs [3]int64
	costs[1] = 1
	_, seen := c[joined]
	if !seen {
		costs[0] = 1
		costs[2] = max(s.Txn.Size, 0)
	}
	res, err := l.take(ctx, s, parts, joined, costs)
	if err != nil || res.Code != rules.Declined {
		return res, err
	}
	if !seen {
		c[joined] = costs[2]
	}
	return res, nil
}

// DataPost takes the message's bytes beyond what its recipients' SIZE=
// hint took, once per value its recipients give.
func (l *Limiter) DataPost(ctx context.Context, s *rules.Session) (rules.Result, error) {
	if l.skip(s) || s.Txn.Size <= 0 || l.budgets[2] == nil && len(l.exact)+len(l.domains) == 0 {
		return rules.Result{}, nil
	}
	c := l.counted(s)
	rcpts := s.Txn.Rcpts
	if !l.perRcpt {
		rcpts = rcpts[:min(1, len(rcpts))]
	}
	done := map[string]bool{}
	for _, r := range rcpts {
		parts, ok := l.value(s, r)
		if !ok {
			continue
		}
		joined := strings.Join(parts, ",")
		if done[joined] {
			continue
		}
		done[joined] = true
		extra := s.Txn.Size - c[joined]
		if extra <= 0 {
			continue
		}
		res, err := l.take(ctx, s, parts, joined, [3]int64{0, 0, extra})
		if err != nil || res.Code != rules.Declined {
			return res, err
		}
		c[joined] = s.Txn.Size
	}
	return rules.Result{}, nil
}

// take asks the store for costs under the value's budgets, and refuses
// when one of them cannot take its cost.
func (l *Limiter) take(ctx context.Context, s *rules.Session, parts []string, joined string, costs [3]int64) (rules.Result, error) {
	bs := l.budgetsFor(joined, parts)
	rates, which := bs.rates(costs)
	hasCost := false
	for _, r := range rates {
		hasCost = hasCost || r.Cost > 0
	}
	if !hasCost {
		return rules.Result{}, nil
	}
	key := l.recordKey(parts)
	ok, used, err := l.store.Limit(ctx, key, l.clock.Now(), rates...)
	if err != nil {
		return rules.Result{}, fmt.Errorf("ratelimit %s: %w", key, err)
	}
	if ok {
		return rules.Result{}, nil
	}
	for i, r := range rates {
		if r.Cost > 0 && used[i] > r.Limit {
			b := which[i]
			l.metrics.RuleEvent(l.name, "exceeded")
			l.log.Debug("rate limit exceeded", "value", joined, "budget", b.kind, "used", used[i], "limit", b.limit, "window", b.written)
			return rules.Decided(rules.DenySoft, rules.CleanText(fmt.Sprintf("Rate limit exceeded for %s: %d %s in %s (limit %d)",
				joined, used[i], b.kind, b.written, b.limit))), nil
		}
	}
	return rules.Result{}, fmt.Errorf("ratelimit %s: the store refused without a budget over its limit (%v of %v)", key, used, rates)
}

// DescribeRecord says what a value's record holds (rules.RecordDescriber):
// per budget, the count now, the limit, and when it is whole again.
func (l *Limiter) DescribeRecord(r store.Record, _ rules.RecordQuery, now time.Time) string {
	pk, ok := store.ParseKey(r.Key)
	if !ok || pk.Tag.Kind != store.SegValue || len(pk.Segs) == 0 || pk.Segs[0].Word != "rate" {
		return ""
	}
	parts := []string{pk.Tag.Text}
	for _, sg := range pk.Segs[1:] {
		parts = append(parts, sg.Text)
	}
	bs := l.budgetsFor(strings.Join(parts, ","), parts)
	var out []string
	for i, b := range bs {
		tat, stored := r.Fields[kinds[i]]
		if b == nil || b.unlimited {
			if stored {
				out = append(out, kinds[i]+": not limited now")
			}
			continue
		}
		_, used, _ := store.RateStep(store.Rate{Field: b.kind, Limit: b.limit, Period: b.period}, tat, stored, now.UnixMicro())
		whole := "whole"
		if ahead := time.Duration(tat-now.UnixMicro()) * time.Microsecond; stored && ahead > 0 {
			whole = "whole in " + ahead.Round(time.Second).String()
		}
		out = append(out, fmt.Sprintf("%s: %d of %d per %s, %s", b.kind, used, b.limit, b.written, whole))
	}
	return strings.Join(out, "; ")
}

// ValueKeys declares the attribute the rule keys its records by, for the
// admin API's lookup by value.
func (l *Limiter) ValueKeys() (store.Keys, []string) { return l.keys, l.attrs }
