// Command policyload drives a policy server (Postfix's policy delegation
// protocol) or a milter with realistic Postfix traffic and reports rate,
// latency percentiles, errors and the answers it got. With -baseline it
// starts its own no-op server instead, so that policyd and the floor of
// the protocol can be measured side by side on the same machine.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"slices"
	"strings"
	"syscall"
	"time"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	os.Exit(run(ctx, os.Args[1:], os.Stdout, os.Stderr))
}

func run(ctx context.Context, args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("policyload", flag.ContinueOnError)
	fs.SetOutput(stderr)
	proto := fs.String("proto", "policy", "protocol: policy or milter")
	addr := fs.String("addr", "", "server to load, host:port on loopback (default 127.0.0.1:10040 for policy, :10041 for milter)")
	conc := fs.Int("c", 4, "concurrency: policy connections or milter sessions at a time")
	dur := fs.Duration("duration", 10*time.Second, "how long to run")
	clients := fs.Int("clients", 1000, "distinct client addresses")
	ipv6 := fs.Float64("ipv6", 0.2, "share of IPv6 clients, 0 to 1")
	body := fs.Int("body", 4096, "message body size in bytes (sent only if the milter asks for the body)")
	msgs := fs.Int("messages", 1, "messages per SMTP session")
	rcpts := fs.Int("rcpts", 2, "recipients per message: 1 to this many")
	states := fs.String("states", "CONNECT,EHLO,MAIL,RCPT,DATA,END-OF-MESSAGE", "policy: the protocol states Postfix asks at (where check_policy_service is listed)")
	fill := fs.Bool("fill", false, "give every client exactly one session, in order, then stop (fills a store with -clients clients)")
	jsonOut := fs.Bool("json", false, "print the report as JSON")
	base := fs.Bool("baseline", false, "load a no-op server, started in a process of its own, instead of -addr")
	inProc := fs.Bool("baseline-in-process", false, "with -baseline: run the no-op server inside policyload instead")
	serveBase := fs.Bool("serve-baseline", false, "serve the no-op server of -proto, print its address, run until stdin closes (what -baseline starts)")
	timeout := fs.Duration("timeout", 10*time.Second, "bound on each dial, read and write")
	seed := fs.Uint64("seed", 1, "random seed: the same seed gives the same sessions")
	connPerReq := fs.Bool("conn-per-request", false, "policy: each request on a connection of its own, half-closed after it (Exim's ${readsocket})")
	flood := fs.String("flood", "", "milter: instead of sessions, a hostile flood: "+strings.Join(floods, " or ")+" (for make soak)")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "policyload: unexpected argument %q\n", fs.Arg(0))
		return 2
	}
	cfg, err := newConfig(*proto, *addr, *conc, *dur, *timeout, *clients, *ipv6, *body, *msgs, *rcpts, *states, *fill, *seed)
	if err != nil {
		fmt.Fprintln(stderr, "policyload:", err)
		return 2
	}
	if *connPerReq {
		if cfg.proto != "policy" {
			fmt.Fprintln(stderr, "policyload: -conn-per-request is for -proto policy")
			return 2
		}
		cfg.connPerRequest = true
	}
	if *flood != "" {
		if cfg.proto != "milter" || !slices.Contains(floods, *flood) {
			fmt.Fprintf(stderr, "policyload: -flood %q: a milter flood, %s\n", *flood, strings.Join(floods, " or "))
			return 2
		}
		cfg.flood = *flood
	}
	if *serveBase {
		if err := serveBaseline(ctx, cfg.proto, os.Stdin, stdout); err != nil {
			fmt.Fprintln(stderr, "policyload:", err)
			return 1
		}
		return 0
	}
	target := cfg.addr
	switch {
	case *base && *inProc:
		b, err := startBaseline(cfg.proto)
		if err != nil {
			fmt.Fprintln(stderr, "policyload:", err)
			return 1
		}
		defer b.close()
		cfg.addr, target = b.addr(), "baseline"
	case *base:
		addr, stop, err := baselineProcess(cfg.proto)
		if err != nil {
			fmt.Fprintln(stderr, "policyload:", err)
			return 1
		}
		defer stop()
		cfg.addr, target = addr, "baseline"
	default:
		if err := loopbackOnly(cfg.addr); err != nil {
			fmt.Fprintln(stderr, "policyload:", err)
			return 2
		}
	}
	rec, elapsed := runLoad(ctx, cfg)
	r := newReport(cfg, target, rec, elapsed)
	if *jsonOut {
		err = r.writeJSON(stdout)
	} else {
		err = r.writeText(stdout)
	}
	if err != nil {
		fmt.Fprintln(stderr, "policyload:", err)
		return 1
	}
	if r.Ops == 0 {
		fmt.Fprintln(stderr, "policyload: nothing was answered")
		return 1
	}
	return 0
}

func newConfig(proto, addr string, conc int, dur, timeout time.Duration, clients int, ipv6 float64, body, msgs, rcpts int, states string, fill bool, seed uint64) (*config, error) {
	switch proto {
	case "policy":
		if addr == "" {
			addr = "127.0.0.1:10040"
		}
	case "milter":
		if addr == "" {
			addr = "127.0.0.1:10041"
		}
	default:
		return nil, fmt.Errorf("proto: %q is neither policy nor milter", proto)
	}
	switch {
	case conc < 1:
		return nil, fmt.Errorf("c: %d, want at least 1", conc)
	case dur <= 0:
		return nil, fmt.Errorf("duration: %v, want more than 0", dur)
	case timeout <= 0:
		return nil, fmt.Errorf("timeout: %v, want more than 0", timeout)
	case body < 0:
		return nil, fmt.Errorf("body: %d, want 0 or more", body)
	case msgs < 1:
		return nil, fmt.Errorf("messages: %d, want at least 1", msgs)
	case rcpts < 1:
		return nil, fmt.Errorf("rcpts: %d, want at least 1", rcpts)
	}
	pool, err := newClientPool(clients, ipv6)
	if err != nil {
		return nil, err
	}
	set, err := parseStates(states)
	if err != nil {
		return nil, err
	}
	return &config{
		proto: proto, addr: addr, concurrency: conc, duration: dur, timeout: timeout,
		states: set, body: makeBody(body), seed: seed,
		gen: &sessionGen{pool: pool, messages: msgs, maxRcpts: rcpts, body: body, fill: fill},
	}, nil
}

// loopbackOnly keeps the load on this machine: a load generator pointed
// at someone else's server by mistake is an attack.
func loopbackOnly(addr string) error {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("addr %q: %w", addr, err)
	}
	if host == "localhost" {
		return nil
	}
	ip := net.ParseIP(host)
	if ip == nil || !ip.IsLoopback() {
		return fmt.Errorf("addr %q: only loopback addresses may be loaded", addr)
	}
	return nil
}
