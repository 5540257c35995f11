// Package hostsallow limits how many SMTP sessions one client may hold open
// at the same time (qpsmtpd's hosts_allow with its max_conn_ip), and gives
// listed networks a fixed answer (the plugin's config file).
//
// Each admitted session holds a slot: a lease in a per-client lease set,
// released when the session ends. A lease runs out by itself, so the slots
// of a policyd that crashed (and never released them) free themselves.
package hostsallow

import (
	"context"
	"crypto/rand"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/store"
)

func init() {
	rules.Register(rules.Definition{Name: "hosts_allow", Setup: setup})
}

// HostsAllow counts concurrent sessions per client.
type HostsAllow struct {
	name      string
	store     store.Store
	clock     rules.Clock
	log       *slog.Logger
	max       int64 // 0: no limit, only the net list
	lease     time.Duration
	keys      store.Keys
	whitelist *rules.PrefixList
	nets      []netAnswer
	text      string
	note      string // connection note holding this instance's slot
}

var (
	_ rules.ConnectHook    = (*HostsAllow)(nil)
	_ rules.ClientKeyer    = (*HostsAllow)(nil)
	_ rules.DisconnectHook = (*HostsAllow)(nil)
	_ rules.HeloHook       = (*HostsAllow)(nil)
	_ rules.MailHook       = (*HostsAllow)(nil)
	_ rules.RcptHook       = (*HostsAllow)(nil)
	_ rules.DataHook       = (*HostsAllow)(nil)
	_ rules.DataPostHook   = (*HostsAllow)(nil)
)

// netAnswer is one line of the qpsmtpd list: clients in prefix get code
// and text, and are not counted.
type netAnswer struct {
	prefix netip.Prefix
	code   rules.Code
	text   string
}

func setup(b *rules.Binder, env rules.Env) (any, error) {
	h := &HostsAllow{
		name:      env.Name,
		store:     env.Store,
		clock:     env.Clock,
		log:       env.Logger,
		max:       b.Int("max_conn_ip", 5, 0, 1<<31),
		lease:     b.Duration("lease", 10*time.Minute, 10*time.Second, 24*time.Hour),
		keys:      store.NewKeys(env.Name, b.IPv6Prefix()),
		whitelist: b.Prefixes("whitelist"),
		note:      env.Name + ":slot",
	}
	for _, v := range b.Strings("net") {
		n, err := parseNet(v)
		if err != nil {
			b.Errorf("net %q: %v", v, err)
			continue
		}
		h.nets = append(h.nets, n)
	}
	h.text = fmt.Sprintf("Too many concurrent connections from your address (more than %d), please try again later", h.max)
	return h, nil
}

// NeedsMilter says why the concurrency limit needs the milter front-end
// (rules.MilterNeeder); the daemon and check say it when the milter
// listener is off.
func (h *HostsAllow) NeedsMilter() string {
	if h.max == 0 {
		return ""
	}
	return fmt.Sprintf("max_conn_ip %d counts concurrent sessions and needs the milter front-end: the policy protocol never reports a disconnect, so behind it a session keeps its slot until the session idles out or its lease (%v) runs out", h.max, h.lease)
}

// Answers are the refusals the rule gives (rules.Answerer): its limit's,
// and those of its net lines.
func (h *HostsAllow) Answers() []rules.Code {
	out := []rules.Code{rules.DenySoftDisconnect}
	for _, n := range h.nets {
		if n.code.IsDeny() && !slices.Contains(out, n.code) {
			out = append(out, n.code)
		}
	}
	return out
}

// parseNet reads "CIDR CODE [text]", qpsmtpd's hosts_allow line.
func parseNet(v string) (netAnswer, error) {
	f := strings.Fields(v)
	if len(f) < 2 {
		return netAnswer{}, fmt.Errorf(`want "network CODE [text]", like "192.0.2.0/24 DENY go away"`)
	}
	p, err := rules.ParsePrefix(f[0])
	if err != nil {
		return netAnswer{}, err
	}
	code, ok := parseCode(f[1])
	if !ok {
		return netAnswer{}, fmt.Errorf("%q is not a return code (DECLINED, OK, DONE, DENY, DENYSOFT, DENY_DISCONNECT, DENYSOFT_DISCONNECT)", f[1])
	}
	// The text is the rest of the line as written, blanks included.
	rest := strings.TrimSpace(strings.TrimSpace(v)[len(f[0]):])
	text := strings.TrimSpace(rest[len(f[1]):])
	return netAnswer{prefix: p, code: code, text: text}, nil
}

func parseCode(s string) (rules.Code, bool) {
	s = strings.ToUpper(s)
	for c := rules.Declined; c <= rules.DenySoftDisconnect; c++ {
		if c.String() == s {
			return c, true
		}
	}
	return 0, false
}

// Member names must never collide between policyd processes sharing one
// Redis: a random process prefix and a per-process session counter.
var (
	processID = strings.ToLower(rand.Text()[:16])
	sessions  atomic.Uint64
)

func newMember() string {
	return processID + "." + strconv.FormatUint(sessions.Add(1), 36)
}

// slot is what an admitted session holds.
type slot struct {
	key     string
	member  string
	renewed atomic.Int64 // unix ms of the last grant
}

// Connect answers listed networks, then takes a slot for everybody else
// and refuses the session when the client already holds max_conn_ip.
func (h *HostsAllow) Connect(ctx context.Context, s *rules.Session) (rules.Result, error) {
	for _, n := range h.nets {
		if n.prefix.Contains(s.Client) {
			return rules.Result{Code: n.code, Text: n.text}, nil
		}
	}
	if h.max == 0 || !s.Client.IsValid() || s.Whitelisted() || h.whitelist.Contains(s.Client) {
		return rules.Result{}, nil
	}
	key := h.keys.Client(s.Client, "sessions")
	member := newMember()
	now := h.clock.Now()
	granted, held, err := h.store.Acquire(ctx, key, member, h.max, now, h.lease)
	if err != nil {
		return rules.Result{}, fmt.Errorf("hosts_allow acquire %s: %w", key, err)
	}
	if !granted {
		h.log.Debug("no free slot", "client", s.Client.String(), "held", held)
		return rules.Decided(rules.DenySoftDisconnect, h.text), nil
	}
	sl := &slot{key: key, member: member}
	sl.renewed.Store(now.UnixMilli())
	s.Notes.Set(h.note, sl)
	return rules.Result{}, nil
}

// Disconnect gives the slot back.
func (h *HostsAllow) Disconnect(ctx context.Context, s *rules.Session) error {
	sl, ok := s.Notes.Get(h.note).(*slot)
	if !ok {
		return nil
	}
	s.Notes.Set(h.note, nil)
	if err := h.store.Release(ctx, sl.key, sl.member); err != nil {
		return fmt.Errorf("hosts_allow release %s: %w", sl.key, err)
	}
	return nil
}

// renew extends the slot's lease once a quarter of it has passed, so a
// long session keeps its slot at the cost of one store call every few
// minutes, and tolerates several minutes of silence between commands.
func (h *HostsAllow) renew(ctx context.Context, s *rules.Session) (rules.Result, error) {
	sl, ok := s.Notes.Get(h.note).(*slot)
	if !ok {
		return rules.Result{}, nil
	}
	now := h.clock.Now()
	if now.UnixMilli()-sl.renewed.Load() < (h.lease / 4).Milliseconds() {
		return rules.Result{}, nil
	}
	granted, held, err := h.store.Acquire(ctx, sl.key, sl.member, h.max, now, h.lease)
	if err != nil {
		return rules.Result{}, fmt.Errorf("hosts_allow renew %s: %w", sl.key, err)
	}
	sl.renewed.Store(now.UnixMilli())
	if !granted {
		// The lease ran out and others took the slots: the session was
		// admitted, so it goes on, uncounted.
		h.log.Debug("slot lost before renewal", "client", s.Client.String(), "held", held)
		s.Notes.Set(h.note, nil)
	}
	return rules.Result{}, nil
}

// Helo renews the slot when due.
func (h *HostsAllow) Helo(ctx context.Context, s *rules.Session) (rules.Result, error) {
	return h.renew(ctx, s)
}

// Mail renews the slot when due.
func (h *HostsAllow) Mail(ctx context.Context, s *rules.Session) (rules.Result, error) {
	return h.renew(ctx, s)
}

// Rcpt renews the slot when due.
func (h *HostsAllow) Rcpt(ctx context.Context, s *rules.Session) (rules.Result, error) {
	return h.renew(ctx, s)
}

// Data renews the slot when due.
func (h *HostsAllow) Data(ctx context.Context, s *rules.Session) (rules.Result, error) {
	return h.renew(ctx, s)
}

// DataPost renews the slot when due.
func (h *HostsAllow) DataPost(ctx context.Context, s *rules.Session) (rules.Result, error) {
	return h.renew(ctx, s)
}

// ClientKeys declares where the rule keeps its records (rules.ClientKeyer).
func (h *HostsAllow) ClientKeys() store.Keys { return h.keys }
