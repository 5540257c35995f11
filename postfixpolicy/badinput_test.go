package postfixpolicy_test

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/testing/testsync"
	"github.com/policyd-mail/policyd/postfixpolicy"
	"github.com/policyd-mail/policyd/rules/rulestest"
)

// Each hostile input gets a log line and a closed connection, while a
// correct request on another connection is answered meanwhile.
func TestBadInputOverSocket(t *testing.T) {
	junk := make([]byte, 64<<10)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range junk {
		junk[i] = byte(rng.UintN(256))
	}
	tests := []struct {
		name    string
		send    func(w io.Writer)
		halfEOF bool
		logs    string
		limit   string // the limit counted, if any
	}{
		{"line without =", func(w io.Writer) { io.WriteString(w, "request=smtpd_access_policy\nthis line has no equals sign\n\n") }, false, "malformed attribute line", ""},
		{"10 MB line", func(w io.Writer) {
			io.WriteString(w, "request=")
			chunk := bytes.Repeat([]byte("x"), 1<<20)
			for range 10 {
				if _, err := w.Write(chunk); err != nil {
					return
				}
			}
		}, false, "line too long", postfixpolicy.LimitLineLength},
		{"100000 attributes", func(w io.Writer) {
			var b bytes.Buffer
			for i := range 100000 {
				b.WriteString("attr")
				b.WriteString(strings.Repeat("x", i%7))
				b.WriteString("=1\n")
			}
			_, _ = w.Write(b.Bytes())
		}, false, "too many attributes", postfixpolicy.LimitAttributes},
		{"binary bytes", func(w io.Writer) { _, _ = w.Write(junk) }, false, "reason=", ""},
		{"NUL in a name", func(w io.Writer) { io.WriteString(w, "request=smtpd_access_policy\nclient\x00address=1.2.3.4\n\n") }, false, "malformed attribute line", ""},
		{"EOF before the empty line", func(w io.Writer) { io.WriteString(w, "request=smtpd_access_policy\nprotocol_state=RCPT\n") }, true, "connection closed inside a request", ""},
	}
	var logs testsync.Buffer
	var counted testsync.Counter
	h := rulestest.New(t, "connection_shaper threshold 100", nil)
	_, addr := start(t, h, postfixpolicy.Config{Logger: slog.New(slog.NewTextHandler(&logs, nil)), LogEvery: -1, LimitHit: counted.Add})
	good := dial(t, addr)
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := strings.Count(logs.String(), "policy connection dropped")
			hitsBefore := counted.Get(tc.limit)
			bad, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer bad.Close()
			sent := make(chan struct{})
			go func() {
				defer close(sent)
				tc.send(bad)
				if tc.halfEOF {
					_ = bad.(*net.TCPConn).CloseWrite()
				}
			}()
			// The good connection is served while the bad one is being read.
			got := good.ask("protocol_state=RCPT", "client_address=192.0.2.50", "client_port="+string(rune('a'+i)), "recipient=r@example.test")
			if got != "DUNNO" {
				t.Fatalf("good request got %q", got)
			}
			// The bad connection is closed without a reply.
			_ = bad.SetReadDeadline(time.Now().Add(10 * time.Second))
			reply, err := io.ReadAll(bad)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatalf("bad connection still open after 10s")
			}
			if len(reply) != 0 && !strings.HasPrefix(string(reply), "action=DUNNO") {
				t.Fatalf("bad input answered %q", reply)
			}
			<-sent
			if after := strings.Count(logs.String(), "policy connection dropped"); after != before+1 {
				t.Fatalf("%d log lines for one dropped connection:\n%s", after-before, logs.String())
			}
			if !strings.Contains(logs.String(), tc.logs) {
				t.Fatalf("log lacks %q:\n%s", tc.logs, logs.String())
			}
			if tc.limit != "" && counted.Get(tc.limit) != hitsBefore+1 {
				t.Fatalf("limit %s counted %d times, want 1", tc.limit, counted.Get(tc.limit)-hitsBefore)
			}
		})
	}
}

// waitClosed fails unless the server closes c within 10s without a reply.
func waitClosed(t *testing.T, c net.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	reply, err := io.ReadAll(c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("connection still open after 10s")
	}
	if len(reply) != 0 {
		t.Fatalf("closed connection answered %q", reply)
	}
}

// Each limit, taken low: the client past it is dropped (or, for
// sessions, its oldest session ended), the hit counted and logged.
func TestLimits(t *testing.T) {
	rcpt := func(port string) string {
		return "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.60\nclient_port=" + port + "\n\n"
	}
	tests := []struct {
		name  string
		cfg   postfixpolicy.Config
		run   func(t *testing.T, addr string)
		limit string
		logs  string
	}{
		{"line length", postfixpolicy.Config{Limits: postfixpolicy.Limits{MaxLine: 64}}, func(t *testing.T, addr string) {
			c := dial(t, addr)
			io.WriteString(c.c, "request=smtpd_access_policy\nhelo_name="+strings.Repeat("h", 64)+"\n\n")
			waitClosed(t, c.c)
		}, postfixpolicy.LimitLineLength, "line too long (over 64 bytes)"},
		{"attributes", postfixpolicy.Config{Limits: postfixpolicy.Limits{MaxAttrs: 3}}, func(t *testing.T, addr string) {
			c := dial(t, addr)
			io.WriteString(c.c, "request=smtpd_access_policy\na=1\nb=2\nc=3\n\n")
			waitClosed(t, c.c)
		}, postfixpolicy.LimitAttributes, "too many attributes (over 3)"},
		{"request size", postfixpolicy.Config{Limits: postfixpolicy.Limits{MaxRequest: 100}}, func(t *testing.T, addr string) {
			c := dial(t, addr)
			io.WriteString(c.c, "request=smtpd_access_policy\n"+strings.Repeat("a=0123456789\n", 10)+"\n")
			waitClosed(t, c.c)
		}, postfixpolicy.LimitRequestSize, "request too large (over 100 bytes)"},
		{"idle time", postfixpolicy.Config{IdleTimeout: 100 * time.Millisecond}, func(t *testing.T, addr string) {
			c := dial(t, addr)
			if got := c.ask("protocol_state=RCPT", "client_address=192.0.2.61", "client_port=1"); got != "DUNNO" {
				t.Fatal(got)
			}
			waitClosed(t, c.c)
		}, postfixpolicy.LimitIdleTime, "no request within 100ms"},
		{"request time", postfixpolicy.Config{RequestTimeout: 100 * time.Millisecond}, func(t *testing.T, addr string) {
			c := dial(t, addr)
			io.WriteString(c.c, "request=smtpd_access_policy\n")
			waitClosed(t, c.c)
		}, postfixpolicy.LimitRequestTime, "request not complete within 100ms"},
		{"connection time while idle", postfixpolicy.Config{MaxConnTime: 200 * time.Millisecond}, func(t *testing.T, addr string) {
			c := dial(t, addr)
			waitClosed(t, c.c)
		}, postfixpolicy.LimitConnTime, "connection open for longer than 200ms"},
		{"connection time while busy", postfixpolicy.Config{MaxConnTime: 200 * time.Millisecond}, func(t *testing.T, addr string) {
			// A client that keeps asking is answered, then cut between
			// requests once past the limit.
			c := dial(t, addr)
			for i := 0; ; i++ {
				_ = c.c.SetDeadline(time.Now().Add(10 * time.Second))
				if _, err := io.WriteString(c.c, rcpt(strconv.Itoa(i))); err != nil {
					break
				}
				line, err := c.br.ReadString('\n')
				if errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET) {
					break
				}
				if err != nil || !strings.HasPrefix(line, "action=") {
					t.Fatalf("request %d: %q %v", i, line, err)
				}
				c.br.ReadString('\n')
			}
		}, postfixpolicy.LimitConnTime, "connection open for longer than 200ms"},
		{"connections", postfixpolicy.Config{MaxConns: 1}, func(t *testing.T, addr string) {
			first := dial(t, addr)
			// Answered: the first connection holds the only slot.
			if got := first.ask("protocol_state=RCPT", "client_address=192.0.2.62", "client_port=1"); got != "DUNNO" {
				t.Fatal(got)
			}
			waitClosed(t, dial(t, addr).c)
			first.c.Close()
			// The slot comes free once the server sees the close.
			deadline := time.Now().Add(10 * time.Second)
			for {
				c := dial(t, addr)
				io.WriteString(c.c, rcpt("2"))
				_ = c.c.SetReadDeadline(deadline)
				if line, err := c.br.ReadString('\n'); err == nil && line == "action=DUNNO\n" {
					return
				}
				c.c.Close() // a refused try: its descriptor goes now, not at the end
				if time.Now().After(deadline) {
					t.Fatal("the freed slot was never taken")
				}
			}
		}, postfixpolicy.LimitConns, "too many policy connections"},
		// Before, 900 silent connections locked every MTA connection out
		// for up to 330 s: at the cap, the longest silent one goes.
		{"silent connections make room", postfixpolicy.Config{MaxConns: 3, MinIdle: 100 * time.Millisecond}, func(t *testing.T, addr string) {
			var silent []*client
			for range 3 {
				silent = append(silent, dial(t, addr))
			}
			deadline := time.Now().Add(10 * time.Second)
			for {
				c := dial(t, addr)
				io.WriteString(c.c, rcpt("3"))
				_ = c.c.SetReadDeadline(deadline)
				if line, err := c.br.ReadString('\n'); err == nil && line == "action=DUNNO\n" {
					break
				}
				c.c.Close() // a refused try: its descriptor goes now, not at the end
				if time.Now().After(deadline) {
					t.Fatal("a correct client was never let in past the silent ones")
				}
			}
			waitClosed(t, silent[0].c) // the longest silent
		}, postfixpolicy.LimitConns, "closed the longest silent one for a new one"},
		{"sessions", postfixpolicy.Config{MaxSessions: 2}, func(t *testing.T, addr string) {
			// Three smtpd processes, each in a session: one connection each
			// (a connection's previous session ends when it moves on).
			for _, port := range []string{"1", "2", "3"} {
				if got := dial(t, addr).ask("protocol_state=RCPT", "client_address=192.0.2.63", "client_port="+port); got != "DUNNO" {
					t.Fatal(got)
				}
			}
		}, postfixpolicy.LimitSessions, "too many policy sessions tracked"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var logs testsync.Buffer
			var counted testsync.Counter
			cfg := tc.cfg
			cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
			cfg.LimitHit = counted.Add
			h := rulestest.New(t, "connection_shaper threshold 1000", nil)
			_, addr := start(t, h, cfg)
			tc.run(t, addr)
			// A connection's hit is counted just before its close, which
			// the client may see first: wait for the log line after it.
			deadline := time.Now().Add(10 * time.Second)
			for !strings.Contains(logs.String(), tc.logs) && time.Now().Before(deadline) {
				runtime.Gosched()
			}
			if !strings.Contains(logs.String(), tc.logs) || !strings.Contains(logs.String(), "limit=") {
				t.Fatalf("log lacks %q:\n%s", tc.logs, logs.String())
			}
			// Retries for the freed connection slot may be refused too.
			if n := counted.Get(tc.limit); n != 1 && (tc.limit != postfixpolicy.LimitConns || n < 1) {
				t.Fatalf("limit %s counted %d times, want 1\n%s", tc.limit, n, logs.String())
			}
		})
	}
}

// The lines about dropped connections come at a bounded rate, with the
// number held back; every drop is still counted.
func TestDropLogRateLimited(t *testing.T) {
	var logs testsync.Buffer
	var counted testsync.Counter
	h := rulestest.New(t, "connection_shaper threshold 1000", nil)
	_, addr := start(t, h, postfixpolicy.Config{Logger: slog.New(slog.NewTextHandler(&logs, nil)), LogEvery: time.Hour,
		LimitHit: counted.Add, Limits: postfixpolicy.Limits{MaxAttrs: 1}})
	for range 5 {
		c := dial(t, addr)
		io.WriteString(c.c, "request=smtpd_access_policy\na=1\n\n")
		waitClosed(t, c.c)
	}
	deadline := time.Now().Add(10 * time.Second)
	for counted.Get(postfixpolicy.LimitAttributes) < 5 && time.Now().Before(deadline) {
		runtime.Gosched()
	}
	if n := counted.Get(postfixpolicy.LimitAttributes); n != 5 {
		t.Fatalf("%d hits counted, want 5", n)
	}
	if n := strings.Count(logs.String(), "policy connection dropped"); n != 1 {
		t.Fatalf("%d lines for 5 drops within the interval:\n%s", n, logs.String())
	}
}
