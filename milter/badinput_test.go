package milter_test

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log"
	"log/slog"
	"math/rand/v2"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/testing/testsync"
	"github.com/policyd-mail/policyd/milter"
	"github.com/policyd-mail/policyd/rules/rulestest"
)

func packet(cmd byte, data []byte) []byte {
	out := binary.BigEndian.AppendUint32(nil, uint32(len(data)+1))
	return append(append(out, cmd), data...)
}

func optneg(version, actions, protocol uint32) []byte {
	d := binary.BigEndian.AppendUint32(nil, version)
	d = binary.BigEndian.AppendUint32(d, actions)
	d = binary.BigEndian.AppendUint32(d, protocol)
	return packet('O', d)
}

// macroPacket defines n macros at once.
func macroPacket(n int) []byte {
	d := []byte{'C'}
	for i := range n {
		d = fmt.Appendf(d, "{m%d}\x00v\x00", i)
	}
	return packet('D', d)
}

// waitClosed fails unless the server closes c within 10s.
func waitClosed(t *testing.T, c net.Conn) {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	_, err := io.Copy(io.Discard, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatal("connection still open after 10s")
	}
}

// waitOpen waits until the server holds n connections.
func waitOpen(t *testing.T, srv *milter.Server, n int) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for srv.Open() != n {
		if time.Now().After(deadline) {
			t.Fatalf("%d connections open, want %d", srv.Open(), n)
		}
		runtime.Gosched()
	}
}

// Broken input closes that connection with one line in our log (none
// from go-milter), counted when it is a limit; other connections keep
// being served; goroutines come back down.
func TestBadInputOverSocket(t *testing.T) {
	var gologs, logs testsync.Buffer
	log.SetOutput(&gologs) // go-milter logs through the standard logger
	defer log.SetOutput(io.Discard)
	junk := make([]byte, 4096)
	rng := rand.New(rand.NewPCG(3, 4))
	for i := range junk {
		junk[i] = byte(rng.UintN(256))
	}
	junk[0] = 0x7f // a huge length, whatever the rest says
	tests := []struct {
		name  string
		input []byte
		half  bool // close our write side after sending
		logs  string
		limit string // the limit counted, if any
	}{
		{"length 0xFFFFFFFF", []byte{0xff, 0xff, 0xff, 0xff, 'O'}, false, "packet of 4294967295 bytes", milter.LimitPacketSize},
		{"length over the limit", binary.BigEndian.AppendUint32(nil, 1<<20), false, "limit 65536", milter.LimitPacketSize},
		{"too many macros", append(optneg(6, 0, 0), macroPacket(257)...), false, "257 macros in one packet, limit 256", milter.LimitMacros},
		{"zero length", []byte{0, 0, 0, 0}, false, "zero-length packet", ""},
		{"truncated packet", append(binary.BigEndian.AppendUint32(nil, 100), "Hhalf a helo"...), true, "truncated packet", ""},
		{"truncated length", []byte{0, 0}, true, "truncated packet", ""},
		{"unknown command byte", packet('Z', nil), false, "unknown command byte 0x5a", ""},
		{"random bytes", junk, false, "limit 65536", milter.LimitPacketSize},
		{"absurd negotiate version", optneg(0xffffffff, 0xffffffff, 0xffffffff), false, "milter version 4294967295", ""},
		{"short negotiate", packet('O', []byte{0, 0, 0, 6}), false, "short option negotiation", ""},
		// Before, go-milter kept every header line until the end of the
		// headers: 4 connections x 500 MiB of them took RSS to 3 GB.
		{"header lines, negotiated off", append(optneg(6, 0, 0), packet('L', []byte("X-Flood\x00"+strings.Repeat("x", 1000)+"\x00"))...), false, "header packet, which policyd negotiated off", ""},
		{"body chunk, negotiated off", append(optneg(6, 0, 0), packet('B', []byte("body"))...), false, "body packet", ""},
		// Before, these reached go-milter, which logged a line of its own per connection.
		{"empty macro packet", append(optneg(6, 0, 0), packet('D', nil)...), false, "empty macro packet", ""},
		{"quit, new connection", append(optneg(6, 0, 0), packet('K', nil)...), false, "command K", ""},
	}
	var counted testsync.Counter
	h := rulestest.New(t, "connection_shaper threshold 1000", nil)
	srv, addr := serve(t, h, milter.Config{Logger: slog.New(slog.NewTextHandler(&logs, nil)), LogEvery: -1, LimitHit: counted.Add})
	baseline := runtime.NumGoroutine()
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := strings.Count(logs.String(), "\n")
			hitsBefore := counted.Get(tc.limit)
			bad, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer bad.Close()
			bad.Write(tc.input)
			if tc.half {
				bad.(*net.TCPConn).CloseWrite()
			}
			// Another session is served meanwhile.
			if got := session(t, addr, "192.0.2.77", "r@example.test"); got[3] != "rcpt c" {
				t.Fatalf("good session: %v", got)
			}
			waitClosed(t, bad)
			// The server closed it: wait until its goroutine is gone.
			waitOpen(t, srv, 0)
			lines := strings.Split(strings.TrimSpace(logs.String()), "\n")[before:]
			if len(lines) != 1 || !strings.Contains(lines[0], "milter connection dropped") || !strings.Contains(lines[0], tc.logs) {
				t.Fatalf("want one log line with %q, got %q", tc.logs, lines)
			}
			if tc.limit != "" && counted.Get(tc.limit) != hitsBefore+1 {
				t.Fatalf("limit %s counted %d times, want 1", tc.limit, counted.Get(tc.limit)-hitsBefore)
			}
			if g := gologs.String(); g != "" {
				t.Fatalf("go-milter logged on its own: %q", g)
			}
		})
	}
	deadline := time.Now().Add(10 * time.Second)
	for runtime.NumGoroutine() > baseline+2 && time.Now().Before(deadline) {
		runtime.Gosched()
	}
	if n := runtime.NumGoroutine(); n > baseline+2 {
		t.Fatalf("%d goroutines, baseline %d", n, baseline)
	}
}

// Each limit a client can hit without sending anything wrong: the
// connection is closed, the hit counted, and a line logged.
func TestLimits(t *testing.T) {
	tests := []struct {
		name  string
		cfg   milter.Config
		run   func(t *testing.T, srv *milter.Server, addr string)
		limit string
		logs  string
	}{
		{"idle time", milter.Config{IdleTimeout: 100 * time.Millisecond}, func(t *testing.T, _ *milter.Server, addr string) {
			c := dialT(t, addr)
			c.Write(optneg(6, 0, 0))
			waitClosed(t, c)
		}, milter.LimitIdleTime, "no packet within 100ms"},
		{"connection time", milter.Config{MaxConnTime: 300 * time.Millisecond}, func(t *testing.T, _ *milter.Server, addr string) {
			// A session that keeps talking is still cut at its age limit.
			c := dialT(t, addr)
			c.Write(optneg(6, 0, 0))
			for {
				if _, err := c.Write(packet('D', []byte("Cj\x00mx\x00"))); err != nil {
					break
				}
				c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
				if _, err := c.Read(make([]byte, 64)); errors.Is(err, io.EOF) {
					break
				}
			}
			waitClosed(t, c)
		}, milter.LimitConnTime, "connection open for longer than 300ms"},
		{"connections", milter.Config{MaxConns: 1}, func(t *testing.T, srv *milter.Server, addr string) {
			first := dialT(t, addr)
			waitOpen(t, srv, 1)
			second := dialT(t, addr)
			waitClosed(t, second)
			first.Close()
			waitOpen(t, srv, 0)
			// The slot is free again.
			if got := session(t, addr, "192.0.2.78", "r@example.test"); got[3] != "rcpt c" {
				t.Fatalf("session after the limit: %v", got)
			}
		}, milter.LimitConns, "too many milter connections"},
		{"macros per packet", milter.Config{MaxMacros: 3}, func(t *testing.T, _ *milter.Server, addr string) {
			c := dialT(t, addr)
			c.Write(append(optneg(6, 0, 0), macroPacket(4)...))
			waitClosed(t, c)
		}, milter.LimitMacros, "4 macros in one packet, limit 3"},
		{"packet size", milter.Config{MaxPacket: 100}, func(t *testing.T, _ *milter.Server, addr string) {
			c := dialT(t, addr)
			c.Write(packet('H', make([]byte, 100)))
			waitClosed(t, c)
		}, milter.LimitPacketSize, "packet of 101 bytes, limit 100"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var logs testsync.Buffer
			var counted testsync.Counter
			cfg := tc.cfg
			cfg.Logger = slog.New(slog.NewTextHandler(&logs, nil))
			cfg.LimitHit = counted.Add
			h := rulestest.New(t, "connection_shaper threshold 1000", nil)
			srv, addr := serve(t, h, cfg)
			tc.run(t, srv, addr)
			waitOpen(t, srv, 0)
			if n := counted.Get(tc.limit); n != 1 {
				t.Errorf("limit %s counted %d times, want 1", tc.limit, n)
			}
			if !strings.Contains(logs.String(), tc.logs) || !strings.Contains(logs.String(), "limit=") {
				t.Errorf("log lacks %q:\n%s", tc.logs, logs.String())
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
	srv, addr := serve(t, h, milter.Config{Logger: slog.New(slog.NewTextHandler(&logs, nil)), LogEvery: time.Hour, LimitHit: counted.Add})
	for range 5 {
		c := dialT(t, addr)
		c.Write([]byte{0xff, 0xff, 0xff, 0xff})
		waitClosed(t, c)
	}
	waitOpen(t, srv, 0)
	if n := strings.Count(logs.String(), "milter connection dropped"); n != 1 {
		t.Fatalf("%d lines for 5 drops within the interval:\n%s", n, logs.String())
	}
	if n := counted.Get(milter.LimitPacketSize); n != 5 {
		t.Fatalf("%d hits counted, want 5", n)
	}
}

func dialT(t *testing.T, addr string) net.Conn {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}
