package rules

import (
	"context"
	"fmt"
	"log/slog"
	"time"
)

// Running the chain: SPEC §3. Building it is chain.go.

// Panics is how many rule panics the chain recovered.
func (c *Chain) Panics() int64 { return c.panics.Load() }

// Errors is how many times a rule could not decide (store errors, panics).
func (c *Chain) Errors() int64 { return c.errors.Load() }

// Now is the chain's clock.
func (c *Chain) Now() time.Time { return c.opts.Clock.Now() }

// Run runs hook h for session s: the rules in plugins order, the first
// answer other than DECLINED ends the hook, then the deny or ok observers.
// Reset and disconnect hooks run every rule and ignore answers.
func (c *Chain) Run(ctx context.Context, h Hook, s *Session) Decision {
	start := c.opts.Clock.Now()
	d := c.run(ctx, h, s)
	c.opts.Metrics.HookDuration(s.Protocol, h, c.opts.Clock.Now().Sub(start))
	return d
}

// run is SPEC §3 for one hook:
//  1. each rule in plugins order answers; one that cannot decide answers
//     what --on-store-error says (DECLINED, or the tempfail text, but
//     never for a rule that never refuses or a whitelisted client);
//  2. DECLINED passes on, adding its delay (a tarpit) to the hook's answer;
//  3. the first other answer is the decision, with the rule's reply
//     overrides, its log line and its metric;
//  4. a rule on trial (dry_run) decides on paper only: the hook goes on;
//     in a global trial (--dry-run) every rule decides and is logged, the
//     observers see the first would-be decision (the one live would give),
//     and it is returned, marked DryRun;
//  5. the deny or ok observers see the decision the MTA is given.
//
// Reset and disconnect only notify: every rule runs, answers are ignored.
func (c *Chain) run(ctx context.Context, h Hook, s *Session) Decision {
	if h == HookResetTransaction || h == HookDisconnect {
		c.notify(ctx, h, s)
		return Decision{Hook: h}
	}
	if h == HookConnect && len(c.readers) > 0 {
		c.startReads(ctx, s)
		defer func() { s.ahead = nil }()
	}
	var t delays
	var first *Decision // a global trial's first would-be decision
	for i, e := range c.hooks[h] {
		res, err, answered := c.answer(ctx, e, c.fns[h][i], h, s) // 1
		if !answered {
			continue
		}
		dry := c.opts.DryRun || e.dryRun
		if res.Code == Declined { // 2
			t.pass(c.opts.Metrics, e, h, s, res, dry)
			continue
		}
		if res.Delay > 0 && !dry {
			c.opts.Metrics.Delayed(s.Protocol, h, e.name, res.Delay)
		}
		d := c.decide(e, h, res, err, dry, t) // 3
		c.logDecision(s, e, d)
		c.opts.Metrics.Decision(s.Protocol, h, e.name, d.Code, d.DryRun)
		if d.DryRun {
			// Logged with the delay it would have had; given with the
			// delays of the rules not on trial only.
			d.Delay = t.given
		}
		if c.opts.DryRun { // 4: a trial shows what every rule would do
			if first == nil {
				// The observers see what live would have ended the
				// hook with, once, as they would live.
				c.observe(ctx, s, d)
				first = &d
			}
			continue
		}
		if e.dryRun { // 4: must not hide the rules after it
			continue
		}
		if !d.DryRun { // 5
			c.observe(ctx, s, d)
		}
		return d
	}
	if first != nil {
		first.Delay = t.given
		return *first
	}
	return Decision{Hook: h, Delay: t.given}
}

// delays adds up the delays of the rules that passed on.
type delays struct {
	given time.Duration // what the MTA is held for
	// pretend: delays of rules on trial, not given, but shown in a
	// dry-run decision's log line as the delay the MTA would have seen.
	pretend time.Duration
}

func (t *delays) pass(m Metrics, e *entry, h Hook, s *Session, res Result, dry bool) {
	if dry && res.Delay > 0 {
		// A rule on trial must not slow the MTA down.
		e.log.Debug("delay not applied (dry run)", "hook", h.String(), "client", s.Client.String(), "delay", res.Delay)
		t.pretend += res.Delay
		return
	}
	if res.Delay > 0 {
		m.Delayed(s.Protocol, h, e.name, res.Delay)
	}
	t.given += res.Delay
}

// answer runs rule e's hook; answered is false when it could not decide
// and --on-store-error says to carry on without it.
func (c *Chain) answer(ctx context.Context, e *entry, f hookFunc, h Hook, s *Session) (res Result, err error, answered bool) {
	res, err = c.call(ctx, e, f, h, s)
	if err == nil && res.Code > DenySoftDisconnect {
		err = fmt.Errorf("%s: answered unknown code %d", e.name, res.Code)
		e.log.Error("rule answered an unknown code", "hook", h.String(), "code", int(res.Code))
	}
	if err != nil {
		c.errors.Add(1)
		// A rule that never refuses has nothing to refuse for, and a
		// whitelisted client is exempt from the rules it could reach.
		if c.opts.OnStoreError == FailOpen || e.neverRefuses || s.Whitelisted() {
			return Result{}, err, false
		}
		res = Result{Code: DenySoft, Text: tempfailText}
	}
	return res, err, true
}

// decide makes rule e's answer the hook's decision, with its reply.
func (c *Chain) decide(e *entry, h Hook, res Result, err error, dry bool, t delays) Decision {
	d := Decision{Hook: h, Rule: e.name, Code: res.Code, Text: res.Text, Delay: t.given + res.Delay, Err: err, DryRun: dry}
	if dry {
		d.Delay += t.pretend
	}
	if !d.Code.IsDeny() {
		return d
	}
	ovr := e.ovr
	if err != nil {
		ovr = override{} // the operator's text is about the rule's verdict, not our outage
	}
	d.Reply = replyFor(d.Code, d.Text, ovr)
	d.Text = d.Reply.Text
	if (ovr.code != 0 && !d.Reply.CodeSet) || (ovr.enhanced != "" && d.Reply.Enhanced != ovr.enhanced) {
		e.warnOverride.Do(func() {
			e.log.Warn("code or enhanced override not applied: an override replaces only codes of its own class, and never a disconnecting answer's",
				"answer", d.Code.String(), "code", ovr.code, "enhanced", ovr.enhanced, "reply", d.Reply.String())
		})
	}
	return d
}

// notify runs every rule of a reset or disconnect hook; their failures
// are counted and logged like any other.
func (c *Chain) notify(ctx context.Context, h Hook, s *Session) {
	for i, e := range c.hooks[h] {
		_, _, _ = c.answer(ctx, e, c.fns[h][i], h, s)
	}
}

// call runs one rule's hook with panic recovery and error logging.
func (c *Chain) call(ctx context.Context, e *entry, f hookFunc, h Hook, s *Session) (res Result, err error) {
	defer func() {
		if p := recover(); p != nil {
			c.panics.Add(1)
			c.opts.Metrics.RuleError(e.name, h, "panic")
			err = fmt.Errorf("%s: panic in %s hook: %v", e.name, h, p)
			e.log.Error("rule panicked", "hook", h.String(), "client", s.Client.String(), "panic", fmt.Sprint(p))
		}
	}()
	res, err = f(ctx, s)
	if err != nil {
		c.opts.Metrics.RuleError(e.name, h, errorKind(err))
		if n, ok := e.errLog.Allow(c.opts.Clock.Now()); ok {
			e.log.Warn("rule could not decide", "hook", h.String(), "client", s.Client.String(), "err", err, "suppressed", n)
		}
	}
	return res, err
}

// observe fires the deny or ok observers after a decision. Their answers
// are ignored, but their failures are counted and logged like any other.
func (c *Chain) observe(ctx context.Context, s *Session, d Decision) {
	h := HookOK
	if d.Code.IsDeny() {
		h = HookDeny
	}
	for _, e := range c.hooks[h] {
		_, _ = c.call(ctx, e, func(ctx context.Context, s *Session) (Result, error) {
			if x, ok := e.rule.(Scripted); ok {
				return Result{}, x.Observe(ctx, h, s, d)
			}
			if h == HookDeny {
				return Result{}, e.rule.(DenyObserver).OnDeny(ctx, s, d)
			}
			return Result{}, e.rule.(OKObserver).OnOK(ctx, s, d)
		}, h, s)
	}
}

// logDecision writes the one line per non-DECLINED decision.
func (c *Chain) logDecision(s *Session, e *entry, d Decision) {
	attrs := make([]slog.Attr, 0, 14)
	var qid, sender, rcpt string
	if s.Txn != nil {
		qid, sender = s.Txn.QueueID, s.Txn.Sender
		if d.Hook == HookRcpt {
			// Which recipient a refusal at RCPT was about.
			rcpt = s.Txn.Rcpt
		}
	}
	attrs = append(attrs,
		slog.String("queue_id", qid),
		slog.String("client", s.Client.String()),
		slog.String("client_name", s.ClientName),
		slog.String("helo", s.Helo),
		slog.String("sender", sender),
		slog.String("recipient", rcpt),
		slog.String("hook", d.Hook.String()),
		slog.String("rule", e.name),
		slog.String("answer", d.Code.String()),
		slog.String("text", d.Text),
		slog.Duration("delay", d.Delay),
		slog.Bool("dry_run", d.DryRun),
		slog.String("protocol", s.Protocol),
	)
	if d.Err != nil {
		attrs = append(attrs, slog.String("err", d.Err.Error()))
	}
	c.opts.Logger.LogAttrs(context.Background(), slog.LevelInfo, "decision", attrs...)
}
