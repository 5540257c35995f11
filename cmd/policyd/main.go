// Command policyd brings qpsmtpd-style rules to Postfix and Sendmail over
// the policy delegation and milter protocols.
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path"
	"runtime/debug"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/policyd-mail/policyd/milter"
	"github.com/policyd-mail/policyd/postfixpolicy"
	"github.com/policyd-mail/policyd/rules"
	_ "github.com/policyd-mail/policyd/rules/all"
	"github.com/policyd-mail/policyd/store/memory"
	redisstore "github.com/policyd-mail/policyd/store/redis"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = ""

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	cmd := "serve"
	if len(args) > 0 && !strings.HasPrefix(args[0], "-") {
		cmd, args = args[0], args[1:]
	}
	if cmd == "serve" && len(args) == 1 && (args[0] == "-h" || args[0] == "-help" || args[0] == "--help") {
		// policyd --help: what the commands are, then serve's flags.
		usage(stdout)
		fmt.Fprintln(stdout)
	}
	switch cmd {
	case "serve":
		return serve(args, stderr)
	case "check":
		return check(args, stdout, stderr)
	case "simulate":
		return simulate(args, stdout, stderr)
	case "replay":
		return replayCommand(args, os.Stdin, stdout, stderr)
	case "inspect", "forget":
		return adminCommand(cmd, args, stdout, stderr)
	case "chain":
		return chainCommand(args, stdout, stderr)
	case "version":
		fmt.Fprintln(stdout, "policyd", versionString())
		return 0
	case "help":
		usage(stdout)
		return 0
	}
	fmt.Fprintf(stderr, "policyd: unknown command %q\n", cmd)
	usage(stderr)
	return 2
}

func usage(w io.Writer) {
	fmt.Fprint(w, `usage: policyd [serve] [flags]     run the daemon (policyd serve -h for flags)
       policyd check [--config DIR]  validate a config directory, print the chain
       policyd simulate --ip A [--helo H] [--from S] [--rcpt R]... [flags]
                                     run one SMTP session through the chain (-h for flags)
       policyd replay [--config DIR] [--json] [FILE...]
                                     what the chain would have done to a Postfix log's sessions
       policyd inspect [--http ADDR] [--json] IP|CIDR
                                     what the running daemon stores about a client
       policyd forget [--http ADDR] [--json] IP|CIDR
                                     remove it (-h for flags)
       policyd chain [--http ADDR]   the chain the running daemon serves with
       policyd version
`)
}

func versionString() string {
	v := buildVersion()
	if bi, ok := debug.ReadBuildInfo(); ok {
		v += " " + bi.GoVersion
	}
	return strings.TrimSpace(v)
}

// buildVersion is policyd's version without the Go version: the one set
// at build time, else the module version and VCS revision Go recorded.
func buildVersion() string {
	v := version
	bi, ok := debug.ReadBuildInfo()
	if v == "" && ok {
		v = bi.Main.Version
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				v += " " + s.Value[:12]
			}
		}
	}
	return strings.TrimSpace(v)
}

// options are the daemon's flags (SPEC §2).
type options struct {
	config       string
	policyListen string
	milterListen string
	pluginDir    string
	httpListen   string
	storeURL     string
	stateDir     string
	stateMaxLoss memory.LossLimit
	storeTimeout time.Duration
	redisBatch   bool
	onStoreError string
	adminToken   string
	dryRun       bool
	logFormat    string
	logLevel     string
	drainTimeout time.Duration
	policyDelay  time.Duration

	// Limits on what a client can make the daemon hold (SPEC §8).
	policyMaxLine     int
	policyMaxAttrs    int
	policyMaxRequest  int
	policyMaxConns    int
	policyMaxSessions int
	policyIdle        time.Duration
	policyMaxConnTime time.Duration
	milterMaxPacket   int
	milterMaxMacros   int
	milterMaxConns    int
	milterIdle        time.Duration
	milterMaxConnTime time.Duration
}

func (o *options) register(fs *flag.FlagSet) {
	fs.StringVar(&o.config, "config", "", "config directory (default ./config if it exists, else the built-in chain)")
	fs.StringVar(&o.pluginDir, "plugin-dir", "", "more directories searched for Lua plugins (NAME.lua) before the config directory's plugins.d, comma-separated")
	fs.StringVar(&o.policyListen, "policy-listen", "127.0.0.1:10040", "policy delegation listener, host:port or unix:/path; empty disables")
	fs.StringVar(&o.milterListen, "milter-listen", "127.0.0.1:10041", "milter listener, host:port or unix:/path; empty disables")
	fs.StringVar(&o.httpListen, "http-listen", "127.0.0.1:10042", "HTTP listener for /metrics, /healthz and /readyz; empty disables")
	fs.StringVar(&o.storeURL, "store", "memory", "store: memory (embedded, persisted under --state-dir), redis://host:port/db, rediss://…, redis+sentinel://h1:p,h2:p/master, redis+cluster://h1:p,h2:p")
	fs.StringVar(&o.stateDir, "state-dir", "./state", "where the embedded store persists its data")
	fs.Func("state-max-loss", "refuse to start when damage in --state-dir cost more records than N, or P% of the snapshot (default: start with what could be read)", func(s string) error {
		l, err := memory.ParseLossLimit(s)
		o.stateMaxLoss = l
		return err
	})
	fs.DurationVar(&o.storeTimeout, "store-timeout", redisstore.DefaultTimeout, "bound on every store call")
	fs.BoolVar(&o.redisBatch, "redis-batch", true, "Redis: coalesce concurrent sessions' commands into shared pipelines (false: one round trip per command)")
	fs.StringVar(&o.onStoreError, "on-store-error", "continue", "answer when the store fails: continue or tempfail")
	fs.StringVar(&o.adminToken, "admin-token-file", "", "bearer token file for the admin API")
	fs.BoolVar(&o.dryRun, "dry-run", false, "decide, log and count everything, but tell the MTA to continue")
	fs.StringVar(&o.logFormat, "log-format", "text", "log format: text or json")
	fs.StringVar(&o.logLevel, "log-level", "info", "log level: debug, info, warn or error")
	fs.DurationVar(&o.drainTimeout, "drain-timeout", 30*time.Second, "how long SIGTERM waits for open requests")
	fs.DurationVar(&o.policyDelay, "policy-max-delay", 8*time.Second, "cap on a rule's delay behind the policy protocol; keep it under smtpd_policy_service_timeout")

	// The front-ends read zero as "the default" and a negative bound
	// would cut every client, so limits must be positive; the upper
	// bounds keep one connection's buffers from becoming the harm.
	count := func(p *int, name string, def, most int, usage string) {
		*p = def
		fs.Func(name, usage, func(s string) error {
			n, err := strconv.Atoi(s)
			if err != nil || n < 1 || n > most {
				return fmt.Errorf("%q is not a whole number from 1 to %d", s, most)
			}
			*p = n
			return nil
		})
		fs.Lookup(name).DefValue = strconv.Itoa(def)
	}
	span := func(p *time.Duration, name string, def time.Duration, usage string) {
		*p = def
		fs.Func(name, usage, func(s string) error {
			d, err := time.ParseDuration(s)
			if err != nil || d <= 0 {
				return fmt.Errorf("%q is not a positive duration", s)
			}
			*p = d
			return nil
		})
		fs.Lookup(name).DefValue = def.String()
	}
	count(&o.policyMaxLine, "policy-max-line", postfixpolicy.DefaultLimits.MaxLine, 1<<20, "longest policy attribute line in bytes")
	count(&o.policyMaxAttrs, "policy-max-attrs", postfixpolicy.DefaultLimits.MaxAttrs, 100000, "most attributes in one policy request")
	count(&o.policyMaxRequest, "policy-max-request", postfixpolicy.DefaultLimits.MaxRequest, 16<<20, "largest policy request in bytes")
	count(&o.policyMaxConns, "policy-max-conns", postfixpolicy.DefaultMaxConns, 1<<20, "most open connections on the policy listener")
	count(&o.policyMaxSessions, "policy-max-sessions", postfixpolicy.DefaultMaxSessions, 1<<24, "most SMTP sessions tracked between policy requests")
	span(&o.policyIdle, "policy-idle-timeout", postfixpolicy.DefaultIdleTimeout, "close a policy connection without a request for this long; keep it over smtpd_policy_service_max_idle")
	span(&o.policyMaxConnTime, "policy-max-conn-time", postfixpolicy.DefaultMaxConnTime, "close a policy connection open this long, between requests; keep it over smtpd_policy_service_max_ttl")
	count(&o.milterMaxPacket, "milter-max-packet", milter.DefaultMaxPacket, 1<<20, "largest milter packet in bytes")
	count(&o.milterMaxMacros, "milter-max-macros", milter.DefaultMaxMacros, 100000, "most macros in one milter packet")
	count(&o.milterMaxConns, "milter-max-conns", milter.DefaultMaxConns, 1<<20, "most open connections (SMTP sessions) on the milter listener")
	span(&o.milterIdle, "milter-idle-timeout", milter.DefaultIdleTimeout, "close a milter connection without a packet for this long; keep it over the MTA's SMTP command timeout")
	span(&o.milterMaxConnTime, "milter-max-conn-time", milter.DefaultMaxConnTime, "close a milter connection (one SMTP session) open this long")
}

// parseFlags parses args, then fills every flag not given from its
// POLICYD_<NAME> environment twin: flags win over the environment.
func parseFlags(fs *flag.FlagSet, args []string, env func(string) (string, bool)) error {
	if err := parseFlagsAndArgs(fs, args, env); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q", fs.Arg(0))
	}
	return nil
}

// parseFlagsAndArgs is parseFlags for a command that takes arguments
// after its flags (replay's files).
func parseFlagsAndArgs(fs *flag.FlagSet, args []string, env func(string) (string, bool)) error {
	if err := fs.Parse(args); err != nil {
		return err
	}
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var errs []error
	fs.VisitAll(func(f *flag.Flag) {
		if given[f.Name] {
			return
		}
		name := envName(f.Name)
		// Set but empty counts: POLICYD_MILTER_LISTEN= disables the listener.
		if v, ok := env(name); ok {
			if err := f.Value.Set(v); err != nil {
				errs = append(errs, fmt.Errorf("%s=%q: %w", name, v, err))
			}
		}
	})
	return errors.Join(errs...)
}

// envName is a flag's environment twin: --state-dir is POLICYD_STATE_DIR.
func envName(flag string) string {
	return "POLICYD_" + strings.ToUpper(strings.ReplaceAll(flag, "-", "_"))
}

// otherCommandFlags are the flags of simulate and check that serve has not.
var otherCommandFlags = []string{"ip", "helo", "from", "rcpt", "session", "write", "at", "strict"}

// unknownEnv refuses POLICYD_* variables that no flag of fs reads: a
// misspelt POLICYD_STOR in a systemd drop-in would otherwise run one host
// of a fleet on its private store without a word.
func unknownEnv(fs *flag.FlagSet, environ []string) error {
	known := map[string]bool{}
	var names []string
	fs.VisitAll(func(f *flag.Flag) {
		known[envName(f.Name)] = true
		names = append(names, envName(f.Name))
	})
	// The twins of the other commands' flags (simulate, check) may share
	// an environment with serve.
	for _, f := range otherCommandFlags {
		known[envName(f)] = true
	}
	var bad []string
	for _, kv := range environ {
		k, _, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "POLICYD_") && !known[k] {
			bad = append(bad, k)
		}
	}
	if len(bad) == 0 {
		return nil
	}
	sort.Strings(bad)
	sort.Strings(names)
	return fmt.Errorf("unknown environment variable %s: no flag reads it (a typo?); the known ones are %s",
		strings.Join(bad, ", "), strings.Join(names, " "))
}

func newLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var lv slog.Level
	if err := lv.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log-level: %q is not debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: lv}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, fmt.Errorf("log-format: %q is neither text nor json", format)
}

// configDir resolves --config: the given directory, else ./config if it
// exists, else the built-in chain.
func configDir(dir string) (fs.FS, string, error) {
	if dir == "" {
		if fi, err := os.Stat("config"); err == nil && fi.IsDir() {
			dir = "config"
		} else {
			return rules.DefaultConfig(), "(built-in)", nil
		}
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return nil, "", fmt.Errorf("config directory: %w", err)
	}
	if !fi.IsDir() {
		return nil, "", fmt.Errorf("config directory: %s is not a directory", dir)
	}
	return os.DirFS(dir), dir, nil
}

func check(args []string, stdout, stderr io.Writer) int {
	fset := flag.NewFlagSet("policyd check", flag.ContinueOnError)
	fset.SetOutput(stderr)
	dir := fset.String("config", "", "config directory to check")
	strict := fset.Bool("strict", false, "exit 1 on any warning too (a rule placed where it cannot act, a file no rule reads)")
	// serve's listener flags (and so their environment twins): what a
	// rule cannot do with the listeners the daemon will run is said too.
	var o options
	fset.StringVar(&o.pluginDir, "plugin-dir", "", "the daemon's --plugin-dir: more directories of Lua plugins, comma-separated")
	fset.StringVar(&o.policyListen, "policy-listen", "127.0.0.1:10040", "the daemon's policy listener (empty: off), to check the chain against")
	fset.StringVar(&o.milterListen, "milter-listen", "127.0.0.1:10041", "the daemon's milter listener (empty: off), to check the chain against")
	fset.DurationVar(&o.policyDelay, "policy-max-delay", 8*time.Second, "the daemon's --policy-max-delay, to check the chain's delays against")
	if err := parseFlags(fset, args, os.LookupEnv); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		fmt.Fprintln(stderr, "policyd check:", err)
		return 2
	}
	fsys, name, err := configDir(*dir)
	if err != nil {
		fmt.Fprintln(stderr, "policyd check:", err)
		return 1
	}
	c, warns, err := rules.Load(fsys, name, rules.Options{PluginDirs: o.pluginDirs()})
	for _, w := range warns {
		fmt.Fprintln(stdout, w.Error())
	}
	if err != nil {
		fmt.Fprintln(stdout, err.Error())
		return 1
	}
	nwarn := len(warns)
	for _, w := range listenerWarnings(c, o.policyListen, o.milterListen, o.policyDelay) {
		fmt.Fprintf(stdout, "%s: warning: %s\n", path.Join(name, "plugins"), w)
		nwarn++
	}
	fmt.Fprintf(stdout, "%s: OK, %s\n", name, count(len(c.Rules()), "rule"))
	fmt.Fprint(stdout, c.Describe())
	if *strict && nwarn > 0 {
		fmt.Fprintf(stdout, "%s: %s (--strict)\n", name, count(nwarn, "warning"))
		return 1
	}
	return 0
}

// pluginDirs is --plugin-dir as a list.
func (o *options) pluginDirs() []string {
	var out []string
	for _, d := range strings.Split(o.pluginDir, ",") {
		if d = strings.TrimSpace(d); d != "" {
			out = append(out, d)
		}
	}
	return out
}
