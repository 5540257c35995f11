// Package greylisting defers mail from unknown (client network, sender,
// recipient) triplets, after qpsmtpd's greylisting plugin: a triplet seen
// for the first time gets a temporary failure; a retry after black_timeout
// (and before grey_timeout) is let through and the triplet remembered for
// white_timeout. Real MTAs retry; most spamware does not.
package greylisting

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/netip"
	"strconv"
	"strings"
	"time"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/store"
)

func init() {
	rules.Register(rules.Definition{Name: "greylisting", Setup: setup})
}

// Text is qpsmtpd's reply to a greylisted triplet.
const Text = "This mail is temporarily denied"

// Mode is what the rule does with a triplet it would defer.
type Mode uint8

// The modes of qpsmtpd's plugin.
const (
	ModeDenySoft Mode = iota // defer (the default)
	ModeTestOnly             // record and log, never defer
	ModeOff                  // do nothing
)

// Greylist holds the settings of one instance.
type Greylist struct {
	name                   string
	store                  store.Store
	clock                  rules.Clock
	log                    *slog.Logger
	mode                   Mode
	black, grey, white     time.Duration
	refresh                time.Duration
	remoteIP, sender, rcpt bool
	v4bits, v6bits         int
	keys                   store.Keys
}

var _ rules.RcptHook = (*Greylist)(nil)
var _ rules.DataHook = (*Greylist)(nil)
var _ rules.ClientKeyer = (*Greylist)(nil)

func setup(b *rules.Binder, env rules.Env) (any, error) {
	g := &Greylist{
		name:     env.Name,
		store:    env.Store,
		clock:    env.Clock,
		log:      env.Logger,
		black:    b.Duration("black_timeout", 50*time.Minute, time.Second, 365*24*time.Hour),
		grey:     b.Duration("grey_timeout", 3*time.Hour+20*time.Minute, time.Second, 365*24*time.Hour),
		white:    b.Duration("white_timeout", 36*24*time.Hour, time.Second, 5*365*24*time.Hour),
		remoteIP: b.Bool("remote_ip", true),
		sender:   b.Bool("sender", true),
		rcpt:     b.Bool("recipient", true),
		v4bits:   int(b.Int("ipv4_prefix", 24, 8, 32)),
		v6bits:   b.IPv6Prefix(),
	}
	g.keys = store.NewKeys(env.Name, g.v6bits)
	switch m := b.String("mode", "denysoft"); m {
	case "denysoft":
		g.mode = ModeDenySoft
	case "testonly":
		g.mode = ModeTestOnly
	case "off":
		g.mode = ModeOff
	default:
		b.Errorf("mode: %q is not denysoft, testonly or off", m)
	}
	b.Obsolete("db_dir", "greylist entries live in policyd's store (--store)")
	if g.black >= g.grey {
		b.Errorf("black_timeout (%v) must be shorter than grey_timeout (%v): no retry could ever pass", g.black, g.grey)
	}
	if !g.remoteIP && !g.sender && !g.rcpt {
		b.Errorf("remote_ip, sender and recipient are all off: there is nothing to greylist on")
	}
	// A passing white triplet is written back at most this often, so the
	// usual case costs one store call; its life is white_timeout after its
	// last pass, less at most this.
	g.refresh = min(24*time.Hour, g.white/10)
	return g, nil
}

// skip tells the sessions greylisting leaves alone.
func (g *Greylist) skip(s *rules.Session) bool {
	return g.mode == ModeOff || s.Txn == nil || s.Whitelisted() || s.AuthUser != ""
}

// Rcpt greylists the recipient's triplet. The null sender's are left to
// Data: a sender-verification probe (MAIL FROM:<>, RCPT TO, QUIT) from
// another MTA must get its 250, or that MTA defers its own user's mail
// because of our greylisting (qpsmtpd defers the null sender at DATA too).
func (g *Greylist) Rcpt(ctx context.Context, s *rules.Session) (rules.Result, error) {
	if g.skip(s) || s.Txn.Sender == "" {
		return rules.Result{}, nil
	}
	return g.triplet(ctx, s, s.Txn.Rcpt)
}

// Data greylists a message from the null sender: every recipient's
// triplet is recorded and moved along, and the message is deferred if one
// of them is not white yet.
func (g *Greylist) Data(ctx context.Context, s *rules.Session) (rules.Result, error) {
	if g.skip(s) || s.Txn.Sender != "" {
		return rules.Result{}, nil
	}
	var res rules.Result
	for _, rcpt := range s.Txn.Rcpts {
		r, err := g.triplet(ctx, s, rcpt)
		if err != nil {
			return rules.Result{}, err
		}
		if r.Code != rules.Declined {
			res = r
		}
	}
	return res, nil
}

// triplet checks the triplet of s's client and sender with rcpt.
func (g *Greylist) triplet(ctx context.Context, s *rules.Session, rcpt string) (rules.Result, error) {
	key := g.key(s, rcpt)
	pass, err := g.check(ctx, key, g.clock.Now())
	if err != nil || pass {
		return rules.Result{}, err
	}
	if g.mode == ModeTestOnly {
		g.log.Info("greylisting would defer (mode testonly)", "client", s.Client.String(), "sender", s.Txn.Sender, "rcpt", rcpt)
		return rules.Result{}, nil
	}
	return rules.Decided(rules.DenySoft, Text), nil
}

// check looks the triplet up and moves it along: new → grey (defer),
// grey younger than black_timeout → defer, grey between black_timeout and
// grey_timeout → white (pass), white → pass. The first call is a SetNX
// that records a new triplet and returns a known one's state, so most
// recipients cost one store call; promotion, refresh and restart cost two.
func (g *Greylist) check(ctx context.Context, key string, now time.Time) (bool, error) {
	stored, cur, err := g.store.SetNX(ctx, key, entry('g', now), g.grey)
	if err != nil {
		return false, fmt.Errorf("greylisting setnx %s: %w", key, err)
	}
	if stored {
		return false, nil
	}
	state, since, ok := parse(cur)
	age := now.Sub(since)
	switch {
	case ok && state == 'w' && age < g.white:
		if age >= g.refresh {
			return true, g.set(ctx, key, entry('w', now), g.white)
		}
		return true, nil
	case ok && state == 'g' && age < g.black:
		return false, nil
	case ok && state == 'g' && age < g.grey:
		return true, g.set(ctx, key, entry('w', now), g.white)
	}
	// A stale entry the store has not expired yet (its clock differs from
	// ours) or one we cannot read: the triplet starts over.
	return false, g.set(ctx, key, entry('g', now), g.grey)
}

func (g *Greylist) set(ctx context.Context, key string, v []byte, ttl time.Duration) error {
	if err := g.store.Set(ctx, key, v, ttl); err != nil {
		return fmt.Errorf("greylisting set %s: %w", key, err)
	}
	return nil
}

// entry encodes a triplet's state: "g:<first seen>" or "w:<confirmed or
// last refreshed>", times in unix milliseconds.
func entry(state byte, t time.Time) []byte {
	return strconv.AppendInt([]byte{state, ':'}, t.UnixMilli(), 10)
}

func parse(v []byte) (state byte, t time.Time, ok bool) {
	if len(v) < 3 || v[1] != ':' || (v[0] != 'g' && v[0] != 'w') {
		return 0, time.Time{}, false
	}
	ms, err := strconv.ParseInt(string(v[2:]), 10, 64)
	if err != nil {
		return 0, time.Time{}, false
	}
	return v[0], time.UnixMilli(ms), true
}

// key is "policyd:{<network>}:<instance>:triplet:<hash>": the client
// network is the hash tag, so all of a network's triplets share a Redis
// Cluster slot, and sender and recipient are hashed to keep keys short
// and free of whatever bytes an address may hold.
func (g *Greylist) key(s *rules.Session, rcpt string) string {
	h := sha256.New()
	if g.sender {
		h.Write([]byte("s:"))
		h.Write([]byte(normalize(s.Txn.Sender)))
		h.Write([]byte{0})
	}
	if g.rcpt {
		h.Write([]byte("r:"))
		h.Write([]byte(normalize(rcpt)))
		h.Write([]byte{0})
	}
	var sum [sha256.Size]byte
	triplet := hex.EncodeToString(h.Sum(sum[:0])[:16])
	if n, ok := network(s.Client, g.v4bits, g.v6bits); ok && g.remoteIP {
		return g.keys.Under(n, "triplet", triplet)
	}
	return g.keys.Any("triplet", triplet)
}

// network is the client's network as a prefix: "192.0.2.0/24",
// "2001:db8:1:2::/64".
func network(a netip.Addr, v4bits, v6bits int) (netip.Prefix, bool) {
	a = a.Unmap()
	bits := v6bits
	if a.Is4() {
		bits = v4bits
	}
	p, err := a.Prefix(bits)
	return p, err == nil
}

// normalize compares addresses without angle brackets, in lower case.
func normalize(addr string) string {
	a := strings.TrimSpace(addr)
	a = strings.TrimPrefix(a, "<")
	a = strings.TrimSuffix(a, ">")
	return strings.ToLower(a)
}

// ClientKeys declares where the rule keeps its records (rules.ClientKeyer).
func (g *Greylist) ClientKeys() store.Keys { return g.keys }
