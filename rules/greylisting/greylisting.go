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
	"slices"
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
	// rcptWhite are recipients never greylisted: "local@" (any domain),
	// "@domain", "local@domain", lower case.
	rcptWhite []string
	// nameWhite are client-name suffixes never greylisted ("google.com"
	// matches mail-x.google.com and google.com).
	nameWhite []string
	// awl is how many confirmed triplets whitelist a client network
	// (postgrey's --auto-whitelist-clients); 0 turns it off.
	awl int64
}

var _ rules.RcptHook = (*Greylist)(nil)
var _ rules.DataHook = (*Greylist)(nil)
var _ rules.ClientKeyer = (*Greylist)(nil)
var _ rules.RecordDescriber = (*Greylist)(nil)

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
	g.rcptWhite = bindRecipients(b)
	g.nameWhite = bindNames(b)
	g.awl = b.Int("auto_whitelist", 5, 0, 1_000_000)
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

// defaultRecipients must always reach a site (RFC 5321 section 4.5.1
// for postmaster; RFC 2142 for abuse), so a stranger reporting a problem
// is never sent away for 50 minutes.
var defaultRecipients = []string{"postmaster@", "abuse@"}

// bindRecipients reads whitelist_recipient: entries add to the defaults;
// "none" drops them.
func bindRecipients(b *rules.Binder) []string {
	var out []string
	keepDefaults := true
	for _, set := range b.Each("whitelist_recipient") {
		for _, v := range strings.FieldsFunc(set.Value, isSep) {
			v = strings.ToLower(normalize(v))
			switch {
			case v == "none":
				keepDefaults = false
			case strings.Count(v, "@") != 1 || v == "@":
				b.ErrorAt(set, "%q is not local@, @domain or local@domain", v)
			default:
				out = append(out, v)
			}
		}
	}
	if keepDefaults {
		out = append(slices.Clone(defaultRecipients), out...)
	}
	return out
}

// bindNames reads whitelist_client_name: domain suffixes of the client's
// verified name.
func bindNames(b *rules.Binder) []string {
	var out []string
	for _, set := range b.Each("whitelist_client_name") {
		for _, v := range strings.FieldsFunc(set.Value, isSep) {
			v = strings.Trim(strings.ToLower(v), ".")
			if v == "" || strings.ContainsAny(v, "@/*") || !strings.Contains(v, ".") {
				b.ErrorAt(set, "%q is not a domain name (a suffix such as google.com)", v)
				continue
			}
			out = append(out, v)
		}
	}
	return out
}

func isSep(r rune) bool { return r == ',' || r == ' ' || r == '\t' }

// skip tells the sessions greylisting leaves alone.
func (g *Greylist) skip(s *rules.Session) bool {
	return g.mode == ModeOff || s.Txn == nil || s.Whitelisted() || s.AuthUser != "" || g.nameListed(s.ClientName)
}

// nameListed tells a client whose verified name ends in a listed domain.
// Big senders retry from other networks, so their triplets would never
// be confirmed; their names, unlike their addresses, stay put. The name
// is the one the MTA verified (Postfix's client_name, not
// reverse_client_name), so a spammer cannot claim one.
func (g *Greylist) nameListed(name string) bool {
	if len(g.nameWhite) == 0 || name == "" || name == "unknown" {
		return false
	}
	name = strings.TrimSuffix(strings.ToLower(name), ".")
	for _, suffix := range g.nameWhite {
		if name == suffix || strings.HasSuffix(name, suffix) && name[len(name)-len(suffix)-1] == '.' {
			return true
		}
	}
	return false
}

// rcptListed tells a whitelisted recipient.
func (g *Greylist) rcptListed(rcpt string) bool {
	r := normalize(rcpt)
	at := strings.LastIndexByte(r, '@')
	if at < 0 {
		// A bare local part (Postfix's "postmaster" without a domain).
		at = len(r)
		r += "@"
	}
	for _, w := range g.rcptWhite {
		switch {
		case w[len(w)-1] == '@':
			if r[:at+1] == w {
				return true
			}
		case w[0] == '@':
			if r[at:] == w {
				return true
			}
		case r == w:
			return true
		}
	}
	return false
}

// Rcpt greylists the recipient's triplet. The null sender's are left to
// Data: a sender-verification probe (MAIL FROM:<>, RCPT TO, QUIT) from
// another MTA must get its 250, or that MTA defers its own user's mail
// because of our greylisting (qpsmtpd defers the null sender at DATA too).
func (g *Greylist) Rcpt(ctx context.Context, s *rules.Session) (rules.Result, error) {
	if g.skip(s) || s.Txn.Sender == "" || g.rcptListed(s.Txn.Rcpt) {
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
		if g.rcptListed(rcpt) {
			continue
		}
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
	key := g.key(s.Client, s.Txn.Sender, rcpt)
	awl, awlOK := g.awlKey(s)
	pass, err := g.check(ctx, key, awl, awlOK, g.clock.Now())
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
//
// With auto_whitelist, a confirmation also counts towards the client
// network's tally, and a new triplet from a network whose tally reached
// auto_whitelist passes at once (and is recorded white): known triplets
// never pay for the tally, so the usual recipient still costs one call.
func (g *Greylist) check(ctx context.Context, key, awl string, awlOK bool, now time.Time) (bool, error) {
	stored, cur, err := g.store.SetNX(ctx, key, entry('g', now), g.grey)
	if err != nil {
		return false, fmt.Errorf("greylisting setnx %s: %w", key, err)
	}
	if stored {
		if !awlOK {
			return false, nil
		}
		v, found, err := g.store.Get(ctx, awl)
		if err != nil {
			return false, fmt.Errorf("greylisting auto-whitelist %s: %w", awl, err)
		}
		if n, _ := strconv.ParseInt(string(v), 10, 64); !found || n < g.awl {
			return false, nil
		}
		return true, g.set(ctx, key, entry('w', now), g.white)
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
		if err := g.set(ctx, key, entry('w', now), g.white); err != nil {
			return true, err
		}
		if awlOK {
			// The tally is a window of white_timeout from the first
			// confirmation: a network that stops confirming new
			// triplets loses its pass.
			if _, err := g.store.Incr(ctx, awl, 1, g.white); err != nil {
				return true, fmt.Errorf("greylisting auto-whitelist %s: %w", awl, err)
			}
		}
		return true, nil
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
func (g *Greylist) key(client netip.Addr, sender, rcpt string) string {
	h := sha256.New()
	if g.sender {
		h.Write([]byte("s:"))
		h.Write([]byte(normalize(sender)))
		h.Write([]byte{0})
	}
	if g.rcpt {
		h.Write([]byte("r:"))
		h.Write([]byte(normalize(rcpt)))
		h.Write([]byte{0})
	}
	var sum [sha256.Size]byte
	triplet := hex.EncodeToString(h.Sum(sum[:0])[:16])
	if n, ok := network(client, g.v4bits, g.v6bits); ok && g.remoteIP {
		return g.keys.Under(n, "triplet", triplet)
	}
	return g.keys.Any("triplet", triplet)
}

// awlKey is the auto-whitelist tally of s's client network:
// "policyd:{<network>}:<instance>:confirmed". ok is false when the
// tally is off or the client has no network.
func (g *Greylist) awlKey(s *rules.Session) (string, bool) {
	if g.awl == 0 || !g.remoteIP {
		return "", false
	}
	n, ok := network(s.Client, g.v4bits, g.v6bits)
	if !ok {
		return "", false
	}
	return g.keys.Under(n, "confirmed"), true
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

// DescribeRecord says what a triplet entry or a network's tally means
// (rules.RecordDescriber): the triplet's state and its times as
// durations, and, when the admin named a sender and recipient, which
// entry is theirs, since the key holds only their hash.
func (g *Greylist) DescribeRecord(r store.Record, q rules.RecordQuery, now time.Time) string {
	pk, ok := store.ParseKey(r.Key)
	if !ok || len(pk.Segs) == 0 {
		return ""
	}
	switch pk.Segs[0].Word {
	case "confirmed":
		n, _ := strconv.ParseInt(string(r.Value), 10, 64)
		if g.awl > 0 && n >= g.awl {
			return fmt.Sprintf("auto-whitelisted: %d confirmed triplets (auto_whitelist %d); new triplets from this network pass", n, g.awl)
		}
		return fmt.Sprintf("%d confirmed triplets; auto-whitelisted at %d", n, g.awl)
	case "triplet":
	default:
		return ""
	}
	var who string
	if q.Client.IsValid() && (q.Sender != "" || q.Recipient != "") && r.Key == g.key(q.Client, q.Sender, q.Recipient) {
		var parts []string
		if g.sender {
			parts = append(parts, "sender <"+normalize(q.Sender)+">")
		}
		if g.rcpt {
			parts = append(parts, "recipient <"+normalize(q.Recipient)+">")
		}
		who = "the triplet of " + strings.Join(parts, ", ") + ": "
	}
	state, since, ok := parse(r.Value)
	if !ok {
		return who + "unreadable entry: it starts over at the next attempt"
	}
	age := now.Sub(since)
	if state == 'w' {
		return who + fmt.Sprintf("white: passes; confirmed or last refreshed %s ago, forgotten in %s without a pass", ago(age), ago(g.white-age))
	}
	if age < g.black {
		return who + fmt.Sprintf("grey: first seen %s ago; a retry passes in %s (and until %s from now)", ago(age), ago(g.black-age), ago(g.grey-age))
	}
	return who + fmt.Sprintf("grey: first seen %s ago; the next retry passes (within %s)", ago(age), ago(g.grey-age))
}

// ago rounds a duration for an admin: seconds under an hour, minutes
// under two days, hours beyond.
func ago(d time.Duration) string {
	switch {
	case d < 0:
		d = 0
	case d >= 48*time.Hour:
		return fmt.Sprintf("%dd%dh", d/(24*time.Hour), d%(24*time.Hour)/time.Hour)
	case d >= time.Hour:
		return d.Round(time.Minute).String()
	}
	return d.Round(time.Second).String()
}

// ClientKeys declares where the rule keeps its records (rules.ClientKeyer).
func (g *Greylist) ClientKeys() store.Keys { return g.keys }

// Answers are the refusals the rule gives (rules.Answerer): it only
// defers, so a code override of the other class is reported at load.
func (g *Greylist) Answers() []rules.Code { return []rules.Code{rules.DenySoft} }
