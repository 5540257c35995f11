// Package denysoftclientstats refuses clients temporarily at random, more
// often the worse their network's record (seed 001's
// denysoft_client_stats). It reads the note the client_stats rule sets.
package denysoftclientstats

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"sync"

	"github.com/policyd-mail/policyd/rules"
	clientstats "github.com/policyd-mail/policyd/rules/client_stats"
)

func init() {
	rules.Register(rules.Definition{Name: "denysoft_client_stats", Setup: setup, Needs: []string{"client_stats"}})
}

// Refuser answers DENYSOFT with probability
// (permfail + permfail_bias) / (permfail + permfail_bias + success + success_bias).
type Refuser struct {
	atConnect    bool
	perRecipient bool
	successBias  int64
	permfailBias int64
	draw         func() float64 // uniform in [0, 1)
	drawn        string         // connection note: this session's draw, when drawn once per session
	log          *slog.Logger
	warnOnce     sync.Once
}

var (
	_ rules.ConnectHook = (*Refuser)(nil)
	_ rules.RcptHook    = (*Refuser)(nil)
)

// newDraw makes a rule's random source; seed 0 means unseeded. Tests
// replace it (export_test.go) to choose the draws.
var newDraw = func(seed int64) func() float64 {
	if seed == 0 {
		return rand.Float64 // safe for concurrent use
	}
	var mu sync.Mutex
	r := rand.New(rand.NewPCG(uint64(seed), 0x9e3779b97f4a7c15))
	return func() float64 {
		mu.Lock()
		defer mu.Unlock()
		return r.Float64()
	}
}

func setup(b *rules.Binder, env rules.Env) (any, error) {
	r := &Refuser{
		atConnect:    b.Bool("at_connect", false),
		perRecipient: b.Bool("per_recipient", false),
		successBias:  b.Int("success_bias", 1, 0, 1_000_000),
		permfailBias: b.Int("permfail_bias", 1, 0, 1_000_000),
		draw:         newDraw(b.Int("seed", 0, 0, 1<<62)),
		drawn:        env.Name + ":drawn",
		log:          env.Logger,
	}
	if r.atConnect && r.perRecipient {
		b.Warnf("per_recipient has no effect with at_connect 1: the draw happens once, at connect")
	}
	if r.log == nil {
		r.log = slog.New(slog.DiscardHandler)
	}
	return r, nil
}

// Probability is the chance of a refusal for st with the given biases.
// With no data and both biases 0 it is 0: nothing is held against a
// client nobody knows anything about.
func Probability(st clientstats.Stats, permfailBias, successBias int64) float64 {
	num := st.Permfail + permfailBias
	den := num + st.Success + successBias
	if den <= 0 {
		return 0
	}
	return float64(num) / float64(den)
}

// Connect draws for the session when at_connect is set, and hangs up on
// the client it refuses.
func (r *Refuser) Connect(_ context.Context, s *rules.Session) (rules.Result, error) {
	if !r.atConnect {
		return rules.Result{}, nil
	}
	return r.decide(s, rules.DenySoftDisconnect), nil
}

// Rcpt draws per recipient (per_recipient 1) or once per session, the
// first recipient's draw then holding for the others.
func (r *Refuser) Rcpt(_ context.Context, s *rules.Session) (rules.Result, error) {
	if r.atConnect {
		return rules.Result{}, nil
	}
	if r.perRecipient {
		return r.decide(s, rules.DenySoft), nil
	}
	if res, ok := s.Notes.Get(r.drawn).(rules.Result); ok {
		return res, nil
	}
	res := r.decide(s, rules.DenySoft)
	s.Notes.Set(r.drawn, res)
	return res, nil
}

// decide draws once against the client's probability.
func (r *Refuser) decide(s *rules.Session, refuse rules.Code) rules.Result {
	if s.Whitelisted() {
		return rules.Result{}
	}
	st, ok := clientstats.FromSession(s)
	if !ok {
		r.warnOnce.Do(func() {
			r.log.Warn("no client_stats note: load client_stats before this rule in plugins (or its store read failed); passing such sessions")
		})
		return rules.Result{}
	}
	p := Probability(st, r.permfailBias, r.successBias)
	what := fmt.Sprintf("%d permanent failures, %d successful deliveries from %s", st.Permfail, st.Success, st.Network)
	if p > 0 && r.draw() < p {
		return rules.Decided(refuse, fmt.Sprintf("%s: Rejecting with probability %.3g", what, p))
	}
	r.log.Debug("passing", "client", s.Client.String(), "stats", what, "probability", p)
	return rules.Result{}
}

// Answers are the refusals the rule gives (rules.Answerer): it only
// defers, so a code override of the other class is reported at load.
func (r *Refuser) Answers() []rules.Code {
	return []rules.Code{rules.DenySoft, rules.DenySoftDisconnect}
}
