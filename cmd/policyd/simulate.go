package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/store"
	"github.com/policyd-mail/policyd/store/overlay"
	redisstore "github.com/policyd-mail/policyd/store/redis"
)

// simulate runs one SMTP session through the chain, on the store the
// daemon would use, and prints what each hook answered (SPEC §2). Nothing
// talks to an MTA. The store is read as it is but written only in memory
// (store/overlay), unless --write: trying a client against the daemon's
// Redis must not leave it an offender record or raise its networks' odds.
func simulate(args []string, stdout, stderr io.Writer) int {
	var o options
	var ip, helo, from string
	var rcpts []string
	var nth int
	var write bool
	var at string
	fset := flag.NewFlagSet("policyd simulate", flag.ContinueOnError)
	fset.SetOutput(stderr)
	fset.StringVar(&o.config, "config", "", "config directory (default ./config if it exists, else the built-in chain)")
	fset.StringVar(&o.storeURL, "store", "memory", "store: memory (embedded, under --state-dir), redis://host:port/db, redis+sentinel://h1:p,h2:p/master, redis+cluster://h1:p,h2:p")
	fset.StringVar(&o.stateDir, "state-dir", "", "the embedded store's state directory to read (default: none, an empty store)")
	fset.BoolVar(&write, "write", false, "write the session's counters and records to the store, as a real session would (default: read the store, write nothing to it)")
	fset.StringVar(&at, "at", "", "run the session at this time, RFC 3339 (2026-12-04T15:00:00Z) or from now (+55m): to preview what a retry after a rule's timeout gets")
	fset.DurationVar(&o.storeTimeout, "store-timeout", redisstore.DefaultTimeout, "bound on every store call")
	fset.StringVar(&ip, "ip", "", "the client's address (required)")
	fset.StringVar(&helo, "helo", "", "the client's HELO name; without it the helo hook does not run")
	fset.StringVar(&from, "from", "", "the envelope sender (default the null sender <>)")
	fset.Func("rcpt", "a recipient; repeat for more (without any, the session ends after MAIL)", func(v string) error {
		rcpts = append(rcpts, v)
		return nil
	})
	fset.StringVar(&o.pluginDir, "plugin-dir", "", "more directories of Lua plugins, comma-separated, as serve's")
	fset.StringVar(&o.logFormat, "log-format", "text", "format of what goes to stderr (warnings, errors): text or json, as serve's")
	fset.IntVar(&nth, "session", 1, "simulate the client's Nth session: sessions 1..N-1 run first on the same store, unprinted")
	fset.Usage = func() {
		fmt.Fprint(fset.Output(), `usage: policyd simulate --ip A [--helo H] [--from S] [--rcpt R]... [flags]

Runs one SMTP session through the chain and prints one tab-separated line
per hook, after a header: hook, rule, answer, text, delay. A rule in dry
run shows its answer followed by "(dry run)" on a line of its own. The
session stops where a client would: after a disconnecting answer, a
refused MAIL, or when no recipient was accepted. Exit status 0.

flags:
`)
		fset.PrintDefaults()
	}
	if err := parseFlags(fset, args, os.LookupEnv); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintln(stderr, "policyd simulate:", err)
		return 2
	}
	// Everything on stderr, from a bad flag value to a rule's warning,
	// is one log format, the daemon's, so one parser reads both.
	tap := &decisionTap{}
	var log *slog.Logger
	switch o.logFormat {
	case "text":
		log = slog.New(tap.wrap(slog.NewTextHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	case "json":
		log = slog.New(tap.wrap(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})))
	default:
		fmt.Fprintf(stderr, "policyd simulate: --log-format %q is neither text nor json\n", o.logFormat)
		return 2
	}
	fail := func(rc int, msg string, args ...any) int {
		log.Error("policyd simulate: "+msg, args...)
		return rc
	}
	client, err := netip.ParseAddr(ip)
	if err != nil {
		return fail(2, "--ip is not an IP address", "ip", ip)
	}
	if nth < 1 {
		return fail(2, "--session must be 1 or more", "session", nth)
	}
	var clock rules.Clock = rules.SystemClock{}
	if at != "" {
		t, err := parseAt(at, time.Now())
		if err != nil {
			return fail(2, "--at", "err", err)
		}
		clock = fixedClock{t}
	}

	// The config is looked at first: a wrong --config must not create or
	// lock a state directory.
	fsys, name, err := configDir(o.config)
	if err != nil {
		return fail(1, "no configuration", "err", err)
	}
	st, err := openStore(o)
	if err != nil {
		return fail(1, "no store", "err", err)
	}
	if !write {
		st = overlay.New(st, nil)
	}
	defer st.Close()
	// Rules fail open without their store: every hook would print
	// DECLINED, which reads as "this client passes".
	pctx, cancel := context.WithTimeout(context.Background(), max(o.storeTimeout, time.Second))
	_, _, err = st.Get(pctx, store.Prefix+"simulate")
	cancel()
	if err != nil {
		return fail(1, "the store does not answer, so every rule would fail open", "err", err)
	}
	c, warns, err := rules.Load(fsys, name, rules.Options{Store: st, Logger: log, Clock: clock, PluginDirs: o.pluginDirs()})
	for _, w := range warns {
		log.Warn("config", "problem", w.Error())
	}
	if err != nil {
		return fail(1, "the configuration does not load", "err", configFailure(log, name, err))
	}

	sc := script{client: client, helo: helo, from: from, rcpts: rcpts}
	for n := 1; n < nth; n++ {
		sc.run(c, n, func(string, rules.Decision) {})
	}
	tap.take() // the warm-up sessions' decisions are not shown
	fmt.Fprintln(stdout, "hook\trule\tanswer\ttext\tdelay")
	sc.run(c, nth, func(hook string, d rules.Decision) {
		for _, r := range tap.take() {
			if r.dryRun {
				printRow(stdout, r.hook, r.rule, r.answer+" (dry run)", r.text, r.delay)
			}
		}
		printRow(stdout, hook, d.Rule, d.Code.String(), d.Text, d.Delay)
	})
	return 0
}

func printRow(w io.Writer, hook, rule, answer, text string, delay time.Duration) {
	dash := func(s string) string {
		if s == "" {
			return "-"
		}
		// A tab or newline in a rule's text would break the columns.
		return strings.NewReplacer("\t", " ", "\n", " ", "\r", " ").Replace(s)
	}
	fmt.Fprintf(w, "%s\t%s\t%s\t%s\t%s\n", hook, dash(rule), answer, dash(text), delay)
}

// script is the SMTP dialogue simulate plays.
type script struct {
	client     netip.Addr
	helo, from string
	rcpts      []string
}

// run plays session n through the session model, calling show with the
// step's hook name and the answer the client would get there. It stops
// where an SMTP client would have to.
func (sc script) run(c *rules.Chain, n int, show func(hook string, d rules.Decision)) {
	ctx := context.Background()
	s := rules.NewConversation(c, "simulate", sc.client, n, c.Now())
	s.ID = fmt.Sprintf("simulate-%d", n)
	defer s.End(ctx)
	step := func(hook string, d rules.Decision) (goOn bool) {
		show(hook, d)
		return !(d.Refuses() && d.Code.Disconnects())
	}
	if !step("connect", s.Connect(ctx)) {
		return
	}
	if sc.helo != "" && !step("helo", s.Helo(ctx, sc.helo)) {
		return
	}
	d := s.Mail(ctx, rules.MailFrom{Sender: sc.from, ID: s.ID})
	if !step("mail", d) || d.Refuses() {
		return // an MTA refuses RCPT without a MAIL it accepted
	}
	accepted := 0
	for _, r := range sc.rcpts {
		d := s.Rcpt(ctx, r)
		if !step("rcpt", d) {
			return
		}
		if !d.Refuses() {
			accepted++
		}
	}
	if accepted == 0 {
		return // no DATA without a recipient
	}
	d = s.Data(ctx)
	if !step("data", d) || d.Refuses() {
		return
	}
	step("data_post", s.DataPost(ctx))
}

// decisionTap keeps the engine's decision log records. A rule in dry run
// decides, logs and counts, but the chain goes on to the next rule, so its
// decision is never returned: the log record is the only place to see it.
type decisionTap struct {
	mu   sync.Mutex
	rows []tapRow
}

type tapRow struct {
	hook, rule, answer, text string
	delay                    time.Duration
	dryRun                   bool
}

func (t *decisionTap) wrap(h slog.Handler) slog.Handler { return tapHandler{next: h, tap: t} }

// take returns the decisions recorded since the last call.
func (t *decisionTap) take() []tapRow {
	t.mu.Lock()
	defer t.mu.Unlock()
	rows := t.rows
	t.rows = nil
	return rows
}

type tapHandler struct {
	next slog.Handler
	tap  *decisionTap
}

func (h tapHandler) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelInfo || h.next.Enabled(ctx, l)
}

func (h tapHandler) Handle(ctx context.Context, r slog.Record) error {
	if r.Message == "decision" {
		var row tapRow
		r.Attrs(func(a slog.Attr) bool {
			switch a.Key {
			case "hook":
				row.hook = a.Value.String()
			case "rule":
				row.rule = a.Value.String()
			case "answer":
				row.answer = a.Value.String()
			case "text":
				row.text = a.Value.String()
			case "delay":
				row.delay = a.Value.Duration()
			case "dry_run":
				row.dryRun = a.Value.Bool()
			}
			return true
		})
		h.tap.mu.Lock()
		h.tap.rows = append(h.tap.rows, row)
		h.tap.mu.Unlock()
	}
	if h.next.Enabled(ctx, r.Level) {
		return h.next.Handle(ctx, r)
	}
	return nil
}

func (h tapHandler) WithAttrs(as []slog.Attr) slog.Handler {
	return tapHandler{next: h.next.WithAttrs(as), tap: h.tap}
}

func (h tapHandler) WithGroup(name string) slog.Handler {
	return tapHandler{next: h.next.WithGroup(name), tap: h.tap}
}

// fixedClock is --at: every session of the run happens then.
type fixedClock struct{ t time.Time }

func (c fixedClock) Now() time.Time { return c.t }

// parseAt reads --at: an RFC 3339 time, or +DURATION from now.
func parseAt(s string, now time.Time) (time.Time, error) {
	if d, ok := strings.CutPrefix(s, "+"); ok {
		dur, err := time.ParseDuration(d)
		if err != nil {
			return time.Time{}, fmt.Errorf("%q is not +DURATION (+55m, +2h)", s)
		}
		return now.Add(dur), nil
	}
	t, err := time.Parse(time.RFC3339, s)
	if err != nil {
		return time.Time{}, fmt.Errorf("%q is neither RFC 3339 (2026-12-04T15:00:00Z) nor +DURATION", s)
	}
	return t, nil
}
