// Package clientstats keeps, per client network, how many messages were
// accepted and how many DENY answers were given (seed 001's client_stats),
// and tells the rules after it what the most specific known network did.
package clientstats

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/store"
)

func init() {
	rules.Register(rules.Definition{Name: "client_stats", Setup: setup, NeverRefuses: true})
}

// NoteKey is the connection note holding the client's Stats, set at
// connect (qpsmtpd's client_stats note, its "mostspecific" entry).
const NoteKey = "client_stats"

// The fields of a stats record.
const (
	FieldSuccess  = "success"
	FieldPermfail = "permfail"
)

// Stats is what is known about a client when its session starts: the
// counts of the most specific network that has any. When no network of
// the client has any, Network is the client's own address (/32, /128)
// and both counts are zero.
type Stats struct {
	Network  netip.Prefix
	Success  int64 // accepted messages
	Permfail int64 // DENY and DENY_DISCONNECT answers
}

// Known reports whether any of the client's networks has stats.
func (s Stats) Known() bool { return s.Success+s.Permfail > 0 }

// FromSession returns the note client_stats set at connect, if it ran.
func FromSession(s *rules.Session) (Stats, bool) {
	st, ok := s.Notes.Get(NoteKey).(Stats)
	return st, ok
}

// Levels is how many networks a client is counted in.
const Levels = 4

var (
	v4Bits = [Levels]int{32, 24, 16, 8}
	v6Bits = [Levels]int{128, 64, 48, 32}
)

// Networks returns a's networks, most specific first: IPv4 /32, /24, /16,
// /8; IPv6 /128, /64, /48, /32. ok is false for an invalid address.
func Networks(a netip.Addr) (nets [Levels]netip.Prefix, ok bool) {
	a = a.Unmap()
	bits := v6Bits
	switch {
	case !a.IsValid():
		return nets, false
	case a.Is4():
		bits = v4Bits
	}
	for i, b := range bits {
		p, err := a.Prefix(b)
		if err != nil {
			return nets, false
		}
		nets[i] = p
	}
	return nets, true
}

// Keys returns the store keys of a's records for the rule instance rule
// (normally "client_stats"), in the order of Networks. Every key carries
// the widest network as its hash tag, so one client's four records share
// a Redis Cluster slot and are read or written in one round trip.
func Keys(rule string, a netip.Addr) (keys [Levels]string, ok bool) {
	nets, ok := Networks(a)
	if !ok {
		return keys, false
	}
	return keysOf(store.NewKeys(rule, 64), nets), true
}

// keysOf: "policyd:{10.0.0.0/8}:client_stats:@10.1.2.0/24" and so on.
func keysOf(k store.Keys, nets [Levels]netip.Prefix) (keys [Levels]string) {
	for i, n := range nets {
		keys[i] = k.Net(nets[Levels-1], n)
	}
	return keys
}

// Recorder counts accepted messages and DENY answers per client network.
type Recorder struct {
	name    string
	keys    store.Keys
	store   store.Store
	expire  time.Duration
	pending string // transaction note: the message was accepted at data_post
}

var (
	_ rules.ConnectHook   = (*Recorder)(nil)
	_ rules.ConnectReader = (*Recorder)(nil)
	_ rules.ClientKeyer   = (*Recorder)(nil)
	_ rules.DataPostHook  = (*Recorder)(nil)
	_ rules.ResetHook     = (*Recorder)(nil)
	_ rules.DenyObserver  = (*Recorder)(nil)
	_ rules.OKObserver    = (*Recorder)(nil)
)

func setup(b *rules.Binder, env rules.Env) (any, error) {
	return &Recorder{
		name:    env.Name,
		keys:    store.NewKeys(env.Name, 64),
		store:   env.Store,
		expire:  b.Duration("expire", 30*24*time.Hour, time.Hour, 10*365*24*time.Hour),
		pending: env.Name + ":accepted",
	}, nil
}

// Connect reads the client's four records in one call and notes the most
// specific one that has counts.
func (r *Recorder) Connect(ctx context.Context, s *rules.Session) (rules.Result, error) {
	nets, ok := Networks(s.Client)
	if !ok {
		return rules.Result{}, nil
	}
	recs, ok, err := s.ReadAhead(ctx, r)
	if !ok {
		keys := keysOf(r.keys, nets)
		recs, err = r.store.HGet(ctx, keys[:]...)
	}
	if err != nil {
		return rules.Result{}, fmt.Errorf("client_stats read the records of %s: %w", s.Client, err)
	}
	st := Stats{Network: nets[0]}
	for i, rec := range recs {
		if i < Levels && rec[FieldSuccess]+rec[FieldPermfail] > 0 {
			st = Stats{Network: nets[i], Success: rec[FieldSuccess], Permfail: rec[FieldPermfail]}
			break
		}
	}
	s.Notes.Set(NoteKey, st)
	return rules.Result{}, nil
}

// ConnectReads declares Connect's read (rules.ConnectReader).
func (r *Recorder) ConnectReads(s *rules.Session) []string {
	nets, ok := Networks(s.Client)
	if !ok {
		return nil
	}
	keys := keysOf(r.keys, nets)
	return keys[:]
}

// DataPost marks the message accepted as far as this rule can tell: every
// rule before it declined. A rule after it may still refuse; OnDeny then
// takes the mark back.
func (r *Recorder) DataPost(_ context.Context, s *rules.Session) (rules.Result, error) {
	if s.Txn != nil {
		s.Txn.Notes.Set(r.pending, true)
	}
	return rules.Result{}, nil
}

// OnOK marks the message accepted when a rule before this one accepted it
// at data_post (OK or DONE skips the rest of the hook, this rule included).
func (r *Recorder) OnOK(_ context.Context, s *rules.Session, d rules.Decision) error {
	if d.Hook == rules.HookDataPost && s.Txn != nil {
		s.Txn.Notes.Set(r.pending, true)
	}
	return nil
}

// OnDeny counts a permanent refusal. Temporary ones (DENYSOFT,
// DENYSOFT_DISCONNECT) say nothing about the client — and counting them
// would feed denysoft_client_stats' own refusals back into its odds.
func (r *Recorder) OnDeny(ctx context.Context, s *rules.Session, d rules.Decision) error {
	if d.Hook == rules.HookDataPost && s.Txn != nil {
		s.Txn.Notes.Set(r.pending, false)
	}
	if d.Code != rules.Deny && d.Code != rules.DenyDisconnect {
		return nil
	}
	return r.record(ctx, s.Client, FieldPermfail)
}

// ResetTransaction counts the message if data_post accepted it. It waits
// for the end of the transaction because a rule after this one may still
// refuse at data_post.
func (r *Recorder) ResetTransaction(ctx context.Context, s *rules.Session) error {
	if s.Txn == nil || !s.Txn.Notes.Bool(r.pending) {
		return nil
	}
	s.Txn.Notes.Set(r.pending, false)
	return r.record(ctx, s.Client, FieldSuccess)
}

// record adds one to field at every level of the client, in one call that
// also renews every record's expiry.
func (r *Recorder) record(ctx context.Context, client netip.Addr, field string) error {
	nets, ok := Networks(client)
	if !ok {
		return nil
	}
	keys := keysOf(r.keys, nets)
	var incs [Levels]store.FieldIncr
	for i, k := range keys {
		incs[i] = store.FieldIncr{Key: k, Field: field, Delta: 1}
	}
	if err := r.store.HIncr(ctx, r.expire, incs[:]...); err != nil {
		return fmt.Errorf("client_stats count %s in %s: %w", field, keys[0], err)
	}
	return nil
}

// ClientKeys declares where the rule keeps its records (rules.ClientKeyer).
func (r *Recorder) ClientKeys() store.Keys { return r.keys }
