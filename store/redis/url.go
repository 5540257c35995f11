package redis

import (
	"fmt"
	"net"
	"net/url"
	"strconv"
	"strings"
)

// Mode is how policyd reaches Redis.
type Mode string

// The deployments a --store URL can name.
const (
	ModeSingle   Mode = "single"   // redis:// and rediss://
	ModeSentinel Mode = "sentinel" // redis+sentinel://
	ModeCluster  Mode = "cluster"  // redis+cluster://
)

// Target is a parsed --store URL.
type Target struct {
	Mode Mode
	// Addrs is host:port of the server (single), of the sentinels, or of
	// the cluster's seed nodes.
	Addrs []string
	// Master is the name Sentinel knows the master by.
	Master string
	// DB is the database number; always 0 on a Cluster.
	DB int
	// Username and Password authenticate to the Redis servers (not to the
	// sentinels, which are expected to run without authentication).
	Username string
	Password string
	// TLS is set by the rediss schemes.
	TLS bool
}

// Default ports when a host comes without one.
const (
	defaultPort         = "6379"
	defaultSentinelPort = "26379"
)

// ParseURL reads the --store forms of SPEC §2:
//
//	redis://[user:pass@]host:port[/db]
//	rediss://[user:pass@]host:port[/db]                  (TLS)
//	redis+sentinel://[user:pass@]h1:p,h2:p/master[/db]   (rediss+sentinel: TLS)
//	redis+cluster://[user:pass@]h1:p,h2:p                (rediss+cluster: TLS)
//
// go-redis's own URL parsers only know its ?addr= forms, hence this one.
// A port may be left out (6379, or 26379 for a sentinel); user and password
// are percent-decoded, so a '@' or '/' in a password is written %40 or %2F.
func ParseURL(raw string) (Target, error) {
	t, err := parseURL(raw)
	if err != nil {
		// The password must not reach a log line through the error.
		return Target{}, fmt.Errorf("store URL %q: %w", redact(raw), err)
	}
	return t, nil
}

func parseURL(raw string) (Target, error) {
	var t Target
	scheme, rest, ok := strings.Cut(raw, "://")
	if !ok {
		return t, fmt.Errorf("no scheme: want redis://, rediss://, redis+sentinel:// or redis+cluster://")
	}
	switch strings.ToLower(scheme) {
	case "redis":
		t.Mode = ModeSingle
	case "rediss":
		t.Mode, t.TLS = ModeSingle, true
	case "redis+sentinel":
		t.Mode = ModeSentinel
	case "rediss+sentinel":
		t.Mode, t.TLS = ModeSentinel, true
	case "redis+cluster":
		t.Mode = ModeCluster
	case "rediss+cluster":
		t.Mode, t.TLS = ModeCluster, true
	default:
		return t, fmt.Errorf("unknown scheme %q: want redis, rediss, redis+sentinel or redis+cluster", scheme)
	}
	if i := strings.IndexAny(rest, "?#"); i >= 0 {
		return t, fmt.Errorf("query parameters and fragments are not supported (%q)", rest[i:])
	}
	authority, path, _ := strings.Cut(rest, "/")
	if i := strings.LastIndexByte(authority, '@'); i >= 0 {
		if err := t.setUserinfo(authority[:i]); err != nil {
			return t, err
		}
		authority = authority[i+1:]
	}
	port := defaultPort
	if t.Mode == ModeSentinel {
		port = defaultSentinelPort
	}
	for h := range strings.SplitSeq(authority, ",") {
		addr, err := hostPort(h, port)
		if err != nil {
			return t, err
		}
		t.Addrs = append(t.Addrs, addr)
	}
	if t.Mode == ModeSingle && len(t.Addrs) > 1 {
		return t, fmt.Errorf("%d hosts for a single server: use redis+sentinel:// or redis+cluster:// for several", len(t.Addrs))
	}
	return t, t.setPath(path)
}

func (t *Target) setUserinfo(ui string) error {
	// As in any URL: "user@", "user:pass@" or ":pass@" (Redis before
	// ACLs, the default user).
	user, pass, _ := strings.Cut(ui, ":")
	var err error
	if t.Username, err = url.PathUnescape(user); err != nil {
		return fmt.Errorf("user name: %w", err)
	}
	if t.Password, err = url.PathUnescape(pass); err != nil {
		return fmt.Errorf("password: %w", err)
	}
	return nil
}

// hostPort checks one host[:port], adding the default port.
func hostPort(h, port string) (string, error) {
	if h == "" {
		return "", fmt.Errorf("empty host")
	}
	host, p, err := net.SplitHostPort(h)
	if err != nil {
		// No port: "host", "[::1]" or a bare IPv6 address.
		host, p = strings.TrimSuffix(strings.TrimPrefix(h, "["), "]"), port
		if strings.ContainsAny(host, "[]") || (strings.Contains(host, ":") && !strings.HasPrefix(h, "[")) {
			return "", fmt.Errorf("host %q: write an IPv6 address in brackets, [addr]:port", h)
		}
	}
	if host == "" {
		return "", fmt.Errorf("host %q: empty host name", h)
	}
	if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
		return "", fmt.Errorf("host %q: port %q is not a number from 1 to 65535", h, p)
	}
	return net.JoinHostPort(host, p), nil
}

func (t *Target) setPath(path string) error {
	parts := strings.Split(path, "/")
	if path == "" {
		parts = nil
	}
	if n := len(parts); n > 0 && parts[n-1] == "" {
		parts = parts[:n-1] // one trailing slash is fine
	}
	switch t.Mode {
	case ModeSentinel:
		if len(parts) == 0 || parts[0] == "" {
			return fmt.Errorf("no master name: want redis+sentinel://h1:p,h2:p/master[/db]")
		}
		name, err := url.PathUnescape(parts[0])
		if err != nil {
			return fmt.Errorf("master name: %w", err)
		}
		t.Master = name
		parts = parts[1:]
	case ModeCluster:
		if len(parts) == 1 && parts[0] == "0" {
			return nil
		}
		if len(parts) > 0 {
			return fmt.Errorf("path %q: a Redis Cluster has only database 0, write redis+cluster://h1:p,h2:p", "/"+path)
		}
		return nil
	}
	switch len(parts) {
	case 0:
		return nil
	case 1:
		db, err := strconv.Atoi(parts[0])
		if err != nil || db < 0 {
			return fmt.Errorf("database %q is not a number >= 0", parts[0])
		}
		t.DB = db
		return nil
	}
	return fmt.Errorf("path %q has too many parts", "/"+path)
}

// String gives the target back as a URL with the password hidden, for
// the start-up log.
func (t Target) String() string {
	var b strings.Builder
	b.WriteString("redis")
	if t.TLS {
		b.WriteString("s")
	}
	if t.Mode != ModeSingle {
		b.WriteString("+" + string(t.Mode))
	}
	b.WriteString("://")
	if t.Username != "" || t.Password != "" {
		b.WriteString(url.PathEscape(t.Username))
		if t.Password != "" {
			b.WriteString(":xxx")
		}
		b.WriteString("@")
	}
	b.WriteString(strings.Join(t.Addrs, ","))
	switch t.Mode {
	case ModeSentinel:
		b.WriteString("/" + url.PathEscape(t.Master) + "/" + strconv.Itoa(t.DB))
	case ModeSingle:
		b.WriteString("/" + strconv.Itoa(t.DB))
	}
	return b.String()
}

// redact hides the password of a URL that may not parse.
func redact(raw string) string {
	scheme, rest, ok := strings.Cut(raw, "://")
	if !ok {
		return raw
	}
	authority, path, hasPath := strings.Cut(rest, "/")
	i := strings.LastIndexByte(authority, '@')
	if i < 0 {
		return raw
	}
	user, _, hasPass := strings.Cut(authority[:i], ":")
	if hasPass {
		user += ":xxx"
	}
	out := scheme + "://" + user + authority[i:]
	if hasPath {
		out += "/" + path
	}
	return out
}
