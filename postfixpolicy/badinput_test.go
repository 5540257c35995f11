package postfixpolicy_test

import (
	"bytes"
	"errors"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/postfixpolicy"
	"github.com/policyd-mail/policyd/rules/rulestest"
)

type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

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
	}{
		{"line without =", func(w io.Writer) { io.WriteString(w, "request=smtpd_access_policy\nthis line has no equals sign\n\n") }, false, "malformed attribute line"},
		{"10 MB line", func(w io.Writer) {
			io.WriteString(w, "request=")
			chunk := bytes.Repeat([]byte("x"), 1<<20)
			for range 10 {
				if _, err := w.Write(chunk); err != nil {
					return
				}
			}
		}, false, "line too long"},
		{"100000 attributes", func(w io.Writer) {
			var b bytes.Buffer
			for i := range 100000 {
				b.WriteString("attr")
				b.WriteString(strings.Repeat("x", i%7))
				b.WriteString("=1\n")
			}
			_, _ = w.Write(b.Bytes())
		}, false, "too many attributes"},
		{"binary bytes", func(w io.Writer) { _, _ = w.Write(junk) }, false, "reason="},
		{"NUL in a name", func(w io.Writer) { io.WriteString(w, "request=smtpd_access_policy\nclient\x00address=1.2.3.4\n\n") }, false, "malformed attribute line"},
		{"EOF before the empty line", func(w io.Writer) { io.WriteString(w, "request=smtpd_access_policy\nprotocol_state=RCPT\n") }, true, "connection closed inside a request"},
	}
	var logs syncBuffer
	h := rulestest.New(t, "connection_shaper threshold 100", nil)
	_, addr := start(t, h, postfixpolicy.Config{Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	good := dial(t, addr)
	for i, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := strings.Count(logs.String(), "policy connection dropped")
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
		})
	}
}

// An idle connection is closed after the idle timeout.
func TestIdleConnectionClosed(t *testing.T) {
	h := rulestest.New(t, "connection_shaper", nil)
	_, addr := start(t, h, postfixpolicy.Config{IdleTimeout: 200 * time.Millisecond})
	c := dial(t, addr)
	_ = c.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := c.br.ReadByte(); !errors.Is(err, io.EOF) {
		t.Fatalf("idle connection: read err = %v, want EOF from the server closing it", err)
	}
}
