package main

import (
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/store"
)

// The admin API (SPEC §2): what is stored about a client, and forgetting
// it. policyd inspect and policyd forget are its command-line clients.

// adminRecord is one stored key in the admin API's JSON.
type adminRecord struct {
	Key    string           `json:"key"`
	Rule   string           `json:"rule"`
	About  string           `json:"about"`
	Kind   string           `json:"kind"`
	Value  string           `json:"value,omitempty"`
	Fields map[string]int64 `json:"fields,omitempty"`
	// TTL in seconds; absent when the key does not expire.
	TTL float64 `json:"ttl_seconds,omitempty"`
	// Detail is what the rule that wrote the record says it means, in
	// words (a greylist entry's state and times), when it says anything.
	Detail string `json:"detail,omitempty"`
}

// adminReply is the body of GET and DELETE /api/v1/clients/{client}.
type adminReply struct {
	Client  string        `json:"client"`
	Records []adminRecord `json:"records"`
	// Next, when set, is where the next page starts: GET again with
	// ?after=NEXT (policyd inspect --after NEXT).
	Next string `json:"next,omitempty"`
	// DELETE only: what went, and what concerns the client but stays
	// because it is about a wider network.
	Deleted []adminRecord `json:"deleted,omitempty"`
	Kept    []adminRecord `json:"kept,omitempty"`
}

type adminError struct {
	Error string `json:"error"`
}

// adminPage is the most records one GET answers: a /0 on a store of
// 300 000 records was a 66 MB body and +300 MB of RSS in one answer.
const adminPage = 1000

// adminTimeout bounds one admin request: a scan of a big Redis takes a
// while, but an operator's command must not hang.
const adminTimeout = 30 * time.Second

// toAdmin turns records into the API's, each described by the rule of
// chain c that wrote it (nil c: no descriptions).
func toAdmin(rs []store.Record, c *rules.Chain, q rules.RecordQuery, now time.Time) []adminRecord {
	out := make([]adminRecord, 0, len(rs))
	for _, r := range rs {
		a := adminRecord{Key: r.Key, Rule: r.Rule, About: r.About.String(), Kind: string(r.Kind), Fields: r.Fields}
		if c != nil {
			a.Detail = c.DescribeRecord(r, q, now)
		}
		if r.Kind == store.KindString {
			a.Value = string(r.Value)
		}
		if r.TTL > 0 {
			a.TTL = r.TTL.Round(time.Millisecond).Seconds()
		}
		out = append(out, a)
	}
	return out
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	_ = enc.Encode(v) // the client went away: nothing to do
}

func (d *daemon) adminClients(w http.ResponseWriter, r *http.Request) {
	p, err := store.ParseClient(r.PathValue("client"))
	if err != nil {
		writeJSON(w, http.StatusBadRequest, adminError{err.Error()})
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), adminTimeout)
	defer cancel()
	reply := adminReply{Client: p.String()}
	c, now := d.chain.Load(), time.Now()
	q := rules.RecordQuery{Sender: r.URL.Query().Get("sender"), Recipient: r.URL.Query().Get("recipient")}
	if p.IsSingleIP() {
		q.Client = p.Addr()
	}
	if r.Method == http.MethodDelete && tooWide(p) && r.URL.Query().Get("force") != "1" {
		writeJSON(w, http.StatusBadRequest, adminError{fmt.Sprintf(
			"%s is wider than /%d (IPv6 /%d): forgetting it deletes what is stored about every client in it; repeat with --force (?force=1) if that is what you mean",
			p, forgetMinBits4, forgetMinBits6)})
		return
	}
	if r.Method == http.MethodDelete {
		var deleted, kept []store.Record
		deleted, kept, err = store.ForgetClient(ctx, d.rawStore, p, c.ClientIPv6Prefix())
		reply.Deleted, reply.Kept = toAdmin(deleted, c, q, now), toAdmin(kept, c, q, now)
		reply.Records = reply.Kept
		if err == nil {
			d.log.Info("admin forget", "client", p.String(), "deleted", len(deleted), "kept", len(kept), "remote", r.RemoteAddr)
		}
	} else {
		var found []store.Record
		found, reply.Next, err = store.FindClientPage(ctx, d.rawStore, p, r.URL.Query().Get("after"), adminPage)
		reply.Records = toAdmin(found, c, q, now)
	}
	if err != nil {
		code := http.StatusInternalServerError
		if errors.Is(err, store.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded) {
			code = http.StatusServiceUnavailable
		}
		d.log.Warn("admin request failed", "client", p.String(), "method", r.Method, "err", err)
		writeJSON(w, code, adminError{err.Error()})
		return
	}
	writeJSON(w, http.StatusOK, reply)
}

// adminKeys is GET and DELETE /api/v1/keys/{name}/{value}: what is
// stored about a value of an attribute (ratelimit's budgets of a SASL
// login), and forgetting it. A compound value is comma-joined, names
// and values alike: /api/v1/keys/sasl_username,recipient_domain/alice,example.org.
func (d *daemon) adminKeys(w http.ResponseWriter, r *http.Request) {
	names := strings.Split(r.PathValue("name"), ",")
	values := strings.Split(r.PathValue("value"), ",")
	if len(names) != len(values) || r.PathValue("value") == "" {
		writeJSON(w, http.StatusBadRequest, adminError{fmt.Sprintf("%d names for %d values: give NAME=VALUE, comma-joined for a compound key (sasl_username,recipient_domain=alice,example.org)", len(names), len(values))})
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), adminTimeout)
	defer cancel()
	var found []store.ValueRecord
	var err error
	if r.Method == http.MethodDelete {
		found, err = store.ForgetValue(ctx, d.rawStore, names, values)
	} else {
		found, err = store.FindValue(ctx, d.rawStore, names, values)
	}
	what := r.PathValue("name") + "=" + strings.ToLower(r.PathValue("value"))
	if err != nil {
		code := http.StatusInternalServerError
		switch {
		case errors.Is(err, store.ErrUnavailable) || errors.Is(err, context.DeadlineExceeded):
			code = http.StatusServiceUnavailable
		case strings.Contains(err.Error(), "not an attribute name"):
			code = http.StatusBadRequest
		}
		d.log.Warn("admin request failed", "key", what, "method", r.Method, "err", err)
		writeJSON(w, code, adminError{err.Error()})
		return
	}
	c, now := d.chain.Load(), time.Now()
	recs := make([]adminRecord, 0, len(found))
	for _, f := range found {
		a := toAdmin([]store.Record{{Entry: f.Entry, Rule: f.Rule}}, c, rules.RecordQuery{}, now)[0]
		a.About = f.About
		recs = append(recs, a)
	}
	reply := adminReply{Client: what, Records: recs}
	if r.Method == http.MethodDelete {
		reply.Deleted, reply.Records = recs, []adminRecord{}
		d.log.Info("admin forget", "key", what, "deleted", len(recs), "remote", r.RemoteAddr)
	}
	writeJSON(w, http.StatusOK, reply)
}

// A forget of a network wider than these needs force: 0.0.0.0/0 deleted
// every greylisting triplet, statistic and offender record at once.
const (
	forgetMinBits4 = 8
	forgetMinBits6 = 16
)

func tooWide(p netip.Prefix) bool {
	if p.Addr().Is4() {
		return p.Bits() < forgetMinBits4
	}
	return p.Bits() < forgetMinBits6
}

// adminAuth guards the admin API: with a token, every request must carry
// it; without one, only loopback (and unix socket) peers are served, so
// exposing --http-listen for Prometheus does not expose forget.
func adminAuth(token string, next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if token != "" {
			got, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
			if !ok || subtle.ConstantTimeCompare([]byte(got), []byte(token)) != 1 {
				w.Header().Set("WWW-Authenticate", `Bearer realm="policyd"`)
				writeJSON(w, http.StatusUnauthorized, adminError{"the admin API needs the bearer token of --admin-token-file"})
				return
			}
		} else if !loopbackPeer(r.RemoteAddr) {
			writeJSON(w, http.StatusForbidden, adminError{"the admin API answers loopback clients only; set --admin-token-file to allow others"})
			return
		} else if !loopbackHost(r.Host, !isIPPeer(r.RemoteAddr)) {
			// A web page in a browser on this host can reach loopback
			// under a name of its own (DNS rebinding): without a token,
			// only loopback names are served.
			writeJSON(w, http.StatusForbidden, adminError{"the admin API answers requests for a loopback host name only; set --admin-token-file to allow others"})
			return
		}
		next.ServeHTTP(w, r)
	})
}

// isIPPeer reports whether remote is an IP client's address, not a unix
// socket peer's.
func isIPPeer(remote string) bool {
	_, err := netip.ParseAddrPort(remote)
	return err == nil
}

func loopbackPeer(remote string) bool {
	ap, err := netip.ParseAddrPort(remote)
	if err != nil {
		// A unix socket peer has no IP address; the socket's file
		// permissions are its guard.
		_, _, splitErr := net.SplitHostPort(remote)
		return splitErr != nil
	}
	return ap.Addr().Unmap().IsLoopback()
}

// loopbackHost accepts the Host of a request made to a loopback address
// or name ("127.0.0.1:10042", "[::1]:10042", "localhost"), and, from a
// unix-socket client only, the empty or placeholder host: over TCP a web
// page could send those too.
func loopbackHost(host string, unixPeer bool) bool {
	h := host
	if hh, _, err := net.SplitHostPort(host); err == nil {
		h = hh
	}
	h = strings.Trim(h, "[]")
	if h == "localhost" || unixPeer && (h == "" || h == unixHost) {
		return true
	}
	a, err := netip.ParseAddr(h)
	return err == nil && a.Unmap().IsLoopback()
}

// unixHost is the host name policyd inspect puts in requests it sends
// over a unix socket.
const unixHost = "policyd"

// readToken reads --admin-token-file; an empty or unreadable file is an
// error rather than an open API.
func readToken(file string) (string, error) {
	if file == "" {
		return "", nil
	}
	if fi, err := os.Stat(file); err == nil && fi.Mode().Perm()&0o077 != 0 {
		// As ssh says of a key file: a token others can read is theirs.
		slog.Warn("admin-token-file is readable by other users; chmod 600 it", "file", file, "mode", fmt.Sprintf("%#o", fi.Mode().Perm()))
	}
	b, err := os.ReadFile(file)
	if err != nil {
		return "", fmt.Errorf("admin-token-file: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("admin-token-file: %s is empty", file)
	}
	return tok, nil
}

// chainReply is the body of GET /api/v1/chain: what runs now, so that
// after a refused reload an admin sees which chain is serving.
type chainReply struct {
	Rules    []string `json:"rules"`
	Describe string   `json:"describe"`
	// RefusedReload, when set, is why the last reload was refused (the
	// chain above is the one from before it) and when.
	RefusedReload string `json:"refused_reload,omitempty"`
	RefusedAt     string `json:"refused_at,omitempty"`
}

func (d *daemon) adminChain(w http.ResponseWriter, _ *http.Request) {
	c := d.chain.Load()
	reply := chainReply{Rules: c.Rules(), Describe: c.Describe()}
	if f := d.lastReload.Load(); f != nil {
		reply.RefusedReload, reply.RefusedAt = f.err, f.at.UTC().Format(time.RFC3339)
	}
	writeJSON(w, http.StatusOK, reply)
}
