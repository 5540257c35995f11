package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"net/url"
	"os"
	"slices"
	"strings"
	"text/tabwriter"
	"time"
)

// adminCommand is policyd inspect and policyd forget: clients of the
// running daemon's admin API, so they see the store the daemon uses,
// embedded or Redis, without opening it themselves.
func adminCommand(cmd string, args []string, stdout, stderr io.Writer) int {
	fset := flag.NewFlagSet("policyd "+cmd, flag.ContinueOnError)
	fset.SetOutput(stderr)
	httpAddr := fset.String("http", defaultAdminAddr(), "the daemon's --http-listen address (host:port or unix:/path)")
	asJSON := fset.Bool("json", false, "print the API's JSON instead of text")
	tokenFile := fset.String("admin-token-file", "", "file holding the daemon's admin bearer token")
	timeout := fset.Duration("timeout", adminTimeout+5*time.Second, "give up after this long")
	var force *bool
	after, sender, rcpt := new(string), new(string), new(string)
	if cmd == "inspect" {
		after = fset.String("after", "", "the page after this key: what a large network's last page said")
		sender = fset.String("sender", "", "with --recipient: point out the greylist triplet of this envelope sender (\"\" or <> for the null sender)")
		rcpt = fset.String("recipient", "", "with --sender: point out the greylist triplet of this recipient")
	}
	key := fset.String("key", "", "NAME=VALUE instead of a client: what is stored about a value (ratelimit's budgets of sasl_username=alice@example.org; a compound key comma-joined: sasl_username,recipient_domain=alice,example.org)")
	if cmd == "forget" {
		force = fset.Bool("force", false, fmt.Sprintf("forget a network wider than /%d (IPv6 /%d), everything stored about every client in it", forgetMinBits4, forgetMinBits6))
	}
	fset.Usage = func() {
		what := "prints everything the daemon stores about the clients in IP|CIDR: counters,\noffender records, statistics per network, greylist entries, session slots."
		if cmd == "forget" {
			what = "removes what the daemon stores about the clients in IP|CIDR. Records about a\nwider network (client_stats' /24 and /8, greylisting's network) are kept\nand listed: forget that network to remove them."
		}
		fmt.Fprintf(fset.Output(), "usage: policyd %s [flags] IP|CIDR\n       policyd %s [flags] --key NAME=VALUE\n\n%s\n\nflags:\n", cmd, cmd, what)
		fset.PrintDefaults()
	}
	// The client may come before or after the flags.
	var client string
	for {
		if err := fset.Parse(args); err != nil {
			if errors.Is(err, flag.ErrHelp) {
				return 0
			}
			return 2
		}
		if fset.NArg() == 0 {
			break
		}
		if client != "" {
			fmt.Fprintf(stderr, "policyd %s: one IP or CIDR at a time (got %q and %q)\n", cmd, client, fset.Arg(0))
			return 2
		}
		client, args = fset.Arg(0), fset.Args()[1:]
	}
	var apiPath string
	switch {
	case *key != "" && client != "":
		fmt.Fprintf(stderr, "policyd %s: a client or --key, not both\n", cmd)
		return 2
	case *key != "":
		name, value, ok := strings.Cut(*key, "=")
		if !ok || name == "" || value == "" {
			fmt.Fprintf(stderr, "policyd %s: --key %q is not NAME=VALUE (like sasl_username=alice@example.org)\n", cmd, *key)
			return 2
		}
		apiPath = "/api/v1/keys/" + name + "/" + value
	case client == "":
		fset.Usage()
		return 2
	default:
		// The client goes into the path as is: a CIDR's slash is part of
		// the route ({client...}).
		apiPath = "/api/v1/clients/" + client
	}
	if *tokenFile == "" {
		*tokenFile = os.Getenv("POLICYD_ADMIN_TOKEN_FILE")
	}
	token, err := readToken(*tokenFile)
	if err != nil {
		fmt.Fprintf(stderr, "policyd %s: %v\n", cmd, err)
		return 2
	}
	method := http.MethodGet
	if cmd == "forget" {
		method = http.MethodDelete
	}
	ctx, cancel := context.WithTimeout(context.Background(), *timeout)
	defer cancel()
	query := url.Values{}
	if force != nil && *force {
		query.Set("force", "1")
	}
	if *after != "" {
		query.Set("after", *after)
	}
	if *sender != "" || *rcpt != "" {
		query.Set("sender", *sender)
		query.Set("recipient", *rcpt)
	}
	body, code, err := adminRequest(ctx, method, *httpAddr, apiPath, token, query.Encode())
	if err != nil {
		fmt.Fprintf(stderr, "policyd %s: %v\n", cmd, err)
		return 1
	}
	if code != http.StatusOK {
		var e adminError
		if json.Unmarshal(body, &e) != nil || e.Error == "" {
			e.Error = strings.TrimSpace(string(body))
		}
		fmt.Fprintf(stderr, "policyd %s: %s: %s\n", cmd, http.StatusText(code), e.Error)
		if code == http.StatusBadRequest {
			return 2
		}
		return 1
	}
	if *asJSON {
		stdout.Write(body)
		return 0
	}
	var reply adminReply
	if err := json.Unmarshal(body, &reply); err != nil {
		fmt.Fprintf(stderr, "policyd %s: the daemon's answer is not the admin API's JSON: %v\n", cmd, err)
		return 1
	}
	if cmd == "forget" {
		printForget(stdout, reply)
	} else {
		printInspect(stdout, reply)
	}
	return 0
}

// defaultAdminAddr is the daemon's own default, or its
// POLICYD_HTTP_LISTEN when that is set, so one environment serves both.
func defaultAdminAddr() string {
	if v, ok := os.LookupEnv("POLICYD_HTTP_LISTEN"); ok && v != "" {
		return v
	}
	return "127.0.0.1:10042"
}

// adminRequest makes one admin API request to the daemon at addr.
func adminRequest(ctx context.Context, method, addr, apiPath, token, query string) ([]byte, int, error) {
	tr := &http.Transport{}
	base := "http://" + addr
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		tr.DialContext = func(ctx context.Context, _, _ string) (net.Conn, error) {
			var d net.Dialer
			return d.DialContext(ctx, "unix", path)
		}
		base = "http://" + unixHost
	}
	defer tr.CloseIdleConnections()
	// The path is set as is below: a CIDR's slash is part of the route.
	req, err := http.NewRequestWithContext(ctx, method, base+"/", nil)
	if err != nil {
		return nil, 0, fmt.Errorf("--http %q: %w", addr, err)
	}
	req.URL.RawPath = ""
	req.URL.Path = apiPath
	req.URL.RawQuery = query
	if token != "" {
		req.Header.Set("Authorization", "Bearer "+token)
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return nil, 0, fmt.Errorf("is the daemon running with --http-listen %s? %w", addr, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<20))
	if err != nil {
		return nil, 0, fmt.Errorf("reading the answer: %w", err)
	}
	return body, resp.StatusCode, nil
}

func printInspect(w io.Writer, r adminReply) {
	if len(r.Records) == 0 {
		fmt.Fprintf(w, "%s: nothing stored\n", r.Client)
		return
	}
	fmt.Fprintf(w, "%s: %s\n", r.Client, count(len(r.Records), "record"))
	printRecords(w, r.Records)
	if r.Next != "" {
		fmt.Fprintf(w, "more records: policyd inspect --after '%s' %s\n", r.Next, r.Client)
	}
}

func printForget(w io.Writer, r adminReply) {
	fmt.Fprintf(w, "%s: deleted %s\n", r.Client, count(len(r.Deleted), "record"))
	printRecords(w, r.Deleted)
	if len(r.Kept) > 0 {
		fmt.Fprintf(w, "kept %s about wider networks (forget the network to remove them):\n", count(len(r.Kept), "record"))
		printRecords(w, r.Kept)
	}
}

func printRecords(w io.Writer, rs []adminRecord) {
	tw := tabwriter.NewWriter(w, 2, 8, 2, ' ', 0)
	fmt.Fprintln(tw, "RULE\tABOUT\tKIND\tEXPIRES IN\tVALUE")
	for _, r := range rs {
		exp := "never"
		if r.TTL > 0 {
			exp = shortDuration(time.Duration(r.TTL * float64(time.Second)))
		}
		v := recordValue(r)
		if r.Detail != "" {
			v = r.Detail
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.Rule, r.About, r.Kind, exp, v)
	}
	tw.Flush()
}

// shortDuration writes client_stats' month-long expiries in days.
func shortDuration(d time.Duration) string {
	d = d.Round(time.Second)
	if d < 48*time.Hour {
		return d.String()
	}
	return fmt.Sprintf("%dd%dh", d/(24*time.Hour), d%(24*time.Hour)/time.Hour)
}

// recordValue shows a record's value; times kept as unix milliseconds (a
// tally's last event, a session slot's lease) are shown as times.
func recordValue(r adminRecord) string {
	if r.Kind == "string" {
		return r.Value
	}
	var parts []string
	for _, f := range slices.Sorted(maps.Keys(r.Fields)) {
		v := fmt.Sprint(r.Fields[f])
		if r.Kind == "leases" || f == "last" {
			v = time.UnixMilli(r.Fields[f]).UTC().Format(time.RFC3339)
			if r.Kind == "leases" {
				v = "until " + v
			}
		}
		parts = append(parts, f+"="+v)
	}
	return strings.Join(parts, " ")
}

// count is "1 record", "2 records".
func count(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}

// chainCommand is policyd chain: the chain the running daemon serves
// with, and the last reload if it was refused.
func chainCommand(args []string, stdout, stderr io.Writer) int {
	fset := flag.NewFlagSet("policyd chain", flag.ContinueOnError)
	fset.SetOutput(stderr)
	httpAddr := fset.String("http", defaultAdminAddr(), "the daemon's --http-listen address (host:port or unix:/path)")
	tokenFile := fset.String("admin-token-file", os.Getenv("POLICYD_ADMIN_TOKEN_FILE"), "file holding the daemon's admin bearer token")
	if err := fset.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return 0
		}
		return 2
	}
	token, err := readToken(*tokenFile)
	if err != nil {
		fmt.Fprintln(stderr, "policyd chain:", err)
		return 2
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	body, code, err := adminRequest(ctx, http.MethodGet, *httpAddr, "/api/v1/chain", token, "")
	if err != nil {
		fmt.Fprintln(stderr, "policyd chain:", err)
		return 1
	}
	var reply chainReply
	if code != http.StatusOK || json.Unmarshal(body, &reply) != nil {
		fmt.Fprintf(stderr, "policyd chain: %s: %s\n", http.StatusText(code), strings.TrimSpace(string(body)))
		return 1
	}
	fmt.Fprint(stdout, reply.Describe)
	if reply.RefusedReload != "" {
		fmt.Fprintf(stdout, "the last reload (%s) was refused, this chain is the one from before it: %s\n", reply.RefusedAt, reply.RefusedReload)
	}
	return 0
}
