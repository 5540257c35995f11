package main

import (
	"bufio"
	"compress/gzip"
	"container/heap"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/policyd-mail/policyd/internal/maillog"
	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/store/memory"
)

// replayCommand is `policyd replay`: what the chain would have done to the
// sessions of a Postfix log. The sessions' steps run through the chain in
// log-time order, across sessions, each at its log time on the engine's clock,
// on a scratch embedded store, in a global dry run (the chain goes on as
// Postfix did); every would-be decision is reported.
func replayCommand(args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	var o options
	var from, to string
	var asJSON bool
	var year int
	var grace time.Duration
	fset := flag.NewFlagSet("policyd replay", flag.ContinueOnError)
	fset.SetOutput(stderr)
	fset.StringVar(&o.config, "config", "", "config directory (default ./config if it exists, else the built-in chain)")
	fset.StringVar(&o.pluginDir, "plugin-dir", "", "more directories of Lua plugins, comma-separated, as serve's")
	fset.StringVar(&from, "from", "", "replay sessions that connected at or after this time (RFC 3339)")
	fset.StringVar(&to, "to", "", "replay sessions that connected before this time (RFC 3339)")
	fset.BoolVar(&asJSON, "json", false, "print one JSON line per would-be decision on stdout, the summary on stderr")
	fset.IntVar(&year, "year", 0, "the year of traditional syslog timestamps, which have none (default: the file's modification time)")
	fset.DurationVar(&grace, "grace", 10*time.Minute, "log time to wait after a session's disconnect for its messages' qmgr and delivery lines")
	fset.Usage = func() {
		fmt.Fprint(fset.Output(), `usage: policyd replay [--config DIR] [--from TIME] [--to TIME] [--json] [FILE...]

Reads a Postfix log (FILEs, .gz read as such; stdin without any), rebuilds
its SMTP sessions and runs them through the chain in a dry run on a scratch
store, with the engine's clock at each event's log time. Prints what each
rule would have refused, split by what Postfix really did. Exit status 0.

flags:
`)
		fset.PrintDefaults()
	}
	if err := parseFlagsAndArgs(fset, args, os.LookupEnv); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintln(stderr, "policyd replay:", err)
		return 2
	}
	var lo, hi time.Time
	for _, b := range []struct {
		s string
		t *time.Time
	}{{from, &lo}, {to, &hi}} {
		if b.s == "" {
			continue
		}
		t, err := time.Parse(time.RFC3339, b.s)
		if err != nil {
			fmt.Fprintf(stderr, "policyd replay: %q is not an RFC 3339 time (2026-12-04T15:00:00Z)\n", b.s)
			return 2
		}
		*b.t = t
	}
	log := slog.New(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	fsys, name, err := configDir(o.config)
	if err != nil {
		fmt.Fprintln(stderr, "policyd replay: no configuration:", err)
		return 1
	}
	clk := &replayClock{}
	st := memory.New(memory.Options{Now: clk.Now, SweepInterval: -1})
	defer st.Close()
	tap := &decisionTap{}
	chainLog := slog.New(tap.wrap(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	c, warns, err := rules.Load(fsys, name, rules.Options{Store: st, Logger: chainLog, Clock: clk, DryRun: true, PluginDirs: o.pluginDirs()})
	for _, w := range warns {
		log.Warn("config", "problem", w.Error())
	}
	if err != nil {
		fmt.Fprintln(stderr, "policyd replay: the configuration does not load:", configFailure(log, name, err))
		return 1
	}

	r := &replayer{c: c, clk: clk, tap: tap, sum: newReplaySummary()}
	if asJSON {
		r.out = json.NewEncoder(stdout)
	}
	rb := maillog.NewRebuilder(grace)
	run := func(sessions []*maillog.Session) {
		for _, s := range sessions {
			if (!lo.IsZero() && s.Start.Before(lo)) || (!hi.IsZero() && !s.Start.Before(hi)) {
				continue
			}
			r.session(s)
		}
		if len(sessions) > 0 {
			// With no session held, every step queued is in the past.
			t, _ := rb.Oldest()
			r.runUntil(t)
		}
	}
	files := fset.Args()
	if len(files) == 0 {
		files = []string{"-"}
	}
	for _, f := range files {
		if err := r.read(f, stdin, year, rb, run); err != nil {
			fmt.Fprintln(stderr, "policyd replay:", err)
			return 1
		}
	}
	run(rb.Flush())
	r.runUntil(time.Time{})
	sumOut := stdout
	if asJSON {
		sumOut = stderr
	}
	r.sum.write(sumOut, c.Rules())
	return 0
}

// replayClock is the engine's clock during a replay: each hook's log time.
type replayClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *replayClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

// set moves the clock to t, never back: log lines of one second may come
// in any order.
func (c *replayClock) set(t time.Time) {
	c.mu.Lock()
	if t.After(c.t) {
		c.t = t
	}
	c.mu.Unlock()
}

type replayer struct {
	c   *rules.Chain
	clk *replayClock
	tap *decisionTap
	out *json.Encoder
	sum *replaySummary
	// port numbers the sessions: the log has no client port.
	port, seq int
	queue     eventHeap
}

// read streams one file (or stdin for "-") through the parser.
func (r *replayer) read(name string, stdin io.Reader, year int, rb *maillog.Rebuilder, run func([]*maillog.Session)) error {
	var in io.Reader = stdin
	p := maillog.Parser{Year: year}
	if name != "-" {
		f, err := os.Open(name)
		if err != nil {
			return err
		}
		defer f.Close()
		in = f
		if fi, err := f.Stat(); err == nil && year == 0 {
			p.Year = fi.ModTime().Year()
		}
	}
	br := bufio.NewReaderSize(in, 256<<10)
	if head, _ := br.Peek(2); len(head) == 2 && head[0] == 0x1f && head[1] == 0x8b {
		zr, err := gzip.NewReader(br)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		defer zr.Close()
		br = bufio.NewReaderSize(zr, 256<<10)
	}
	// A year-less log's year: a file last written in a month before its
	// first line's month (January, a log that starts in December) began
	// last year.
	yearFixed := year != 0 || name == "-"
	first := true
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			// Longer than any Postfix line: skip the rest of it.
			r.sum.lines++
			r.sum.bad++
			for errors.Is(err, bufio.ErrBufferFull) {
				_, err = br.ReadSlice('\n')
			}
			continue
		}
		if len(line) > 0 {
			r.sum.lines++
			e, perr := p.Parse(string(line))
			switch {
			case errors.Is(perr, maillog.ErrNotPostfix):
			case perr != nil:
				r.sum.bad++
			default:
				if first && !yearFixed {
					if fi, err := os.Stat(name); err == nil && fi.ModTime().Month() < e.Time.Month() {
						p.Year--
						e.Time = e.Time.AddDate(-1, 0, 0)
					}
				}
				first = false
				r.sum.postfix++
				done, aerr := rb.Add(e)
				if aerr != nil {
					r.sum.bad++
				}
				run(done)
			}
		}
		if err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("%s: %w", name, err)
		}
	}
}

// replayLine is one would-be decision of --json.
type replayLine struct {
	Time      string `json:"time"`
	Session   string `json:"session"`
	QueueID   string `json:"queue_id,omitempty"`
	Client    string `json:"client"`
	Sender    string `json:"sender,omitempty"`
	Recipient string `json:"recipient,omitempty"`
	Hook      string `json:"hook"`
	Rule      string `json:"rule"`
	Answer    string `json:"answer"`
	Code      int    `json:"code,omitempty"`
	Text      string `json:"text"`
}

// replayEvent is one step of a session at its log time. Sessions overlap:
// their steps are run in time order across sessions (events), so each
// hook meets the clock, and the store, at its own moment.
type replayEvent struct {
	t    time.Time
	seq  int // the session's number: ties keep sessions apart
	step int // the step's place in its session: ties keep its order
	run  func()
}

type eventHeap []*replayEvent

func (h eventHeap) Len() int { return len(h) }
func (h eventHeap) Less(i, j int) bool {
	if !h[i].t.Equal(h[j].t) {
		return h[i].t.Before(h[j].t)
	}
	if h[i].seq != h[j].seq {
		return h[i].seq < h[j].seq
	}
	return h[i].step < h[j].step
}
func (h eventHeap) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *eventHeap) Push(x any)   { *h = append(*h, x.(*replayEvent)) }
func (h *eventHeap) Pop() any {
	old := *h
	e := old[len(old)-1]
	*h = old[:len(old)-1]
	return e
}

// runUntil runs the queued steps before t (all of them when t is zero):
// the sessions not yet complete connected at t or later, so no step of
// theirs can come before it.
func (r *replayer) runUntil(t time.Time) {
	for r.queue.Len() > 0 && (t.IsZero() || r.queue[0].t.Before(t)) {
		e := heap.Pop(&r.queue).(*replayEvent)
		r.clk.set(e.t)
		e.run()
	}
}

// session queues the steps of one session.
func (r *replayer) session(s *maillog.Session) {
	ctx := context.Background()
	r.port++
	r.seq++
	r.sum.session(s)
	var conv *rules.Conversation
	var msg *maillog.Message
	seq, step := r.seq, 0
	last := s.Start
	add := func(t time.Time, run func()) {
		// A session's steps never go back in time: a refused RCPT logged
		// a moment before its message's client= line stays after MAIL.
		if t.Before(last) {
			t = last
		}
		last = t
		step++
		heap.Push(&r.queue, &replayEvent{t: t, seq: seq, step: step, run: run})
	}
	// hook reports a step's would-be decisions; rcpts are the recipients
	// a refusal there would have cost.
	hook := func(d rules.Decision, rcpt string, rcpts []maillog.Rcpt) {
		for _, row := range r.tap.take() {
			code := defaultCode(row.answer)
			if d.Rule == row.rule && d.Reply.Code != 0 {
				code = d.Reply.Code
			}
			line := replayLine{Time: r.clk.Now().UTC().Format(time.RFC3339), Session: s.ID, Client: s.Client.String(),
				Hook: row.hook, Rule: row.rule, Answer: row.answer, Code: code, Text: row.text, Recipient: rcpt}
			if msg != nil {
				line.QueueID, line.Sender = msg.QueueID, msg.Sender
			}
			if r.out != nil {
				_ = r.out.Encode(line)
			}
			r.sum.decision(s, line, rcpts)
		}
	}
	var all []maillog.Rcpt
	for _, m := range s.Messages {
		all = append(all, m.Rcpts...)
	}
	port := r.port
	add(s.Start, func() {
		conv = rules.NewConversation(r.c, "replay", s.Client, port, s.Start)
		conv.ID, conv.ClientName, conv.AuthUser = s.ID, s.ClientName, s.SASL
		hook(conv.Connect(ctx), "", all)
		if s.Helo != "" {
			hook(conv.Helo(ctx, s.Helo), "", all)
		}
	})
	msgs := slices.Clone(s.Messages)
	sort.SliceStable(msgs, func(i, j int) bool { return msgs[i].Start.Before(msgs[j].Start) })
	for i, m := range msgs {
		id := m.QueueID
		if id == "" {
			id = fmt.Sprintf("%s/noqueue-%d", s.ID, i)
		}
		add(m.Start, func() {
			msg = m
			hook(conv.Mail(ctx, rules.MailFrom{Sender: m.Sender, ID: id, QueueID: m.QueueID}), "", m.Rcpts)
		})
		rcpts := slices.Clone(m.Rcpts)
		sort.SliceStable(rcpts, func(i, j int) bool { return rcpts[i].Time.Before(rcpts[j].Time) })
		accepted := 0
		for _, rc := range rcpts {
			add(rc.Time, func() {
				if conv.Txn != nil {
					conv.Txn.Size = m.Size
				}
				hook(conv.Rcpt(ctx, rc.Addr), rc.Addr, []maillog.Rcpt{rc})
			})
			if !rc.Refused {
				accepted++
			}
		}
		if accepted > 0 && !m.Queued.IsZero() {
			add(m.Queued, func() {
				hook(conv.Data(ctx), "", m.Rcpts)
				hook(conv.DataPost(ctx), "", m.Rcpts)
			})
		}
	}
	add(s.End, func() {
		msg = nil
		conv.End(ctx)
		r.tap.take()
	})
}

func defaultCode(answer string) int {
	switch answer {
	case "DENY":
		return 550
	case "DENYSOFT":
		return 450
	case "DENY_DISCONNECT":
		return 521
	case "DENYSOFT_DISCONNECT":
		return 421
	}
	return 0
}

// replaySummary is the report: per rule what it would have refused.
type replaySummary struct {
	lines, postfix, bad            int
	sessions, messages, rcpts, mta int // mta: recipients Postfix refused
	first, last                    time.Time
	minutes                        map[time.Time]int
	rules                          map[string]*ruleSummary
}

type ruleSummary struct {
	answers map[string]int
	// Sessions come one at a time, and a rule's decisions of one session
	// one after another: counting needs only the present session's
	// recipients, so memory does not grow with the log.
	sessions, delivered, refused int
	last                         string          // the session counted last
	seen                         map[string]bool // its recipients counted
	clients, senders             map[string]int
}

func newReplaySummary() *replaySummary {
	return &replaySummary{minutes: map[time.Time]int{}, rules: map[string]*ruleSummary{}}
}

func (sm *replaySummary) session(s *maillog.Session) {
	sm.sessions++
	if sm.first.IsZero() || s.Start.Before(sm.first) {
		sm.first = s.Start
	}
	if s.End.After(sm.last) {
		sm.last = s.End
	}
	sm.minutes[s.Start.Truncate(time.Minute)]++
	for _, m := range s.Messages {
		sm.messages++
		for _, rc := range m.Rcpts {
			sm.rcpts++
			if rc.Refused {
				sm.mta++
			}
		}
	}
}

func (sm *replaySummary) decision(s *maillog.Session, l replayLine, rcpts []maillog.Rcpt) {
	rs := sm.rules[l.Rule]
	if rs == nil {
		rs = &ruleSummary{answers: map[string]int{}, clients: map[string]int{}, senders: map[string]int{}}
		sm.rules[l.Rule] = rs
	}
	rs.answers[l.Answer]++
	if rs.last != s.ID {
		rs.last, rs.seen = s.ID, map[string]bool{}
		rs.sessions++
		rs.clients[l.Client]++
	}
	if l.Sender != "" || l.QueueID != "" {
		rs.senders["<"+l.Sender+">"]++
	}
	for _, rc := range rcpts {
		if rs.seen[rc.Addr] {
			continue
		}
		rs.seen[rc.Addr] = true
		if rc.Refused {
			rs.refused++
		} else {
			rs.delivered++
		}
	}
}

func (sm *replaySummary) write(w io.Writer, order []string) {
	fmt.Fprintf(w, "policyd replay: %d lines read, %d of Postfix, %d not understood; %d sessions, %d messages, %d recipients (%d refused by Postfix)",
		sm.lines, sm.postfix, sm.bad, sm.sessions, sm.messages, sm.rcpts, sm.mta)
	if !sm.first.IsZero() {
		fmt.Fprintf(w, ", %s to %s", sm.first.UTC().Format(time.RFC3339), sm.last.UTC().Format(time.RFC3339))
	}
	fmt.Fprintln(w)
	var busiest time.Time
	for m, n := range sm.minutes {
		if n > sm.minutes[busiest] || (n == sm.minutes[busiest] && m.Before(busiest)) {
			busiest = m
		}
	}
	if !busiest.IsZero() {
		fmt.Fprintf(w, "busiest minute: %s, %d sessions\n", busiest.UTC().Format("2006-01-02T15:04Z"), sm.minutes[busiest])
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "rule\tanswers\tsessions\trecipients delivered by Postfix\trecipients Postfix refused anyway")
	names := slices.Clone(order)
	for n := range sm.rules {
		if !slices.Contains(names, n) {
			names = append(names, n)
		}
	}
	for _, n := range names {
		rs := sm.rules[n]
		if rs == nil {
			fmt.Fprintf(w, "%s\t-\t0\t0\t0\n", n)
			continue
		}
		fmt.Fprintf(w, "%s\t%s\t%d\t%d\t%d\n", n, counts(rs.answers, 0), rs.sessions, rs.delivered, rs.refused)
	}
	for _, n := range names {
		rs := sm.rules[n]
		if rs == nil {
			continue
		}
		fmt.Fprintf(w, "\n%s: top clients %s", n, counts(rs.clients, 5))
		if len(rs.senders) > 0 {
			fmt.Fprintf(w, "; top senders %s", counts(rs.senders, 5))
		}
		fmt.Fprintln(w)
	}
}

// counts prints "key n, key n" by count, at most max (0: all).
func counts(m map[string]int, max int) string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Slice(keys, func(i, j int) bool {
		if m[keys[i]] != m[keys[j]] {
			return m[keys[i]] > m[keys[j]]
		}
		return keys[i] < keys[j]
	})
	if max > 0 && len(keys) > max {
		keys = keys[:max]
	}
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s %d", k, m[k])
	}
	return strings.Join(parts, ", ")
}
