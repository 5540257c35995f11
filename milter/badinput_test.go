package milter_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"log"
	"math/rand/v2"
	"net"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/milter"
	"github.com/policyd-mail/policyd/rules/rulestest"
)

type lockedBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuf) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuf) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

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

// Broken input closes that connection with one log line; other
// connections keep being served; goroutines come back down.
func TestBadInputOverSocket(t *testing.T) {
	var logs lockedBuf
	log.SetOutput(&logs) // go-milter logs through the standard logger
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
	}{
		{"length 0xFFFFFFFF", []byte{0xff, 0xff, 0xff, 0xff, 'O'}, false, "packet of 4294967295 bytes"},
		{"length over the limit", binary.BigEndian.AppendUint32(nil, 1<<20), false, "limit 65536"},
		{"zero length", []byte{0, 0, 0, 0}, false, "zero-length packet"},
		{"truncated packet", append(binary.BigEndian.AppendUint32(nil, 100), "Hhalf a helo"...), true, "unexpected EOF"},
		{"unknown command byte", packet('Z', nil), false, "unknown command byte 0x5a"},
		{"random bytes", junk, false, "broken milter stream"},
		{"absurd negotiate version", optneg(0xffffffff, 0xffffffff, 0xffffffff), false, "milter version 4294967295"},
		{"short negotiate", packet('O', []byte{0, 0, 0, 6}), false, "short option negotiation"},
	}
	h := rulestest.New(t, "connection_shaper threshold 1000", nil)
	srv, addr := serve(t, h, milter.Config{})
	baseline := runtime.NumGoroutine()
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			before := strings.Count(logs.String(), "\n")
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
			bad.SetReadDeadline(time.Now().Add(10 * time.Second))
			_, err = io.Copy(io.Discard, bad)
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				t.Fatal("broken connection still open after 10s")
			}
			// The server closed it: wait until its goroutine is gone.
			deadline := time.Now().Add(10 * time.Second)
			for srv.Open() > 0 && time.Now().Before(deadline) {
				runtime.Gosched()
			}
			if srv.Open() != 0 {
				t.Fatalf("%d connections still open", srv.Open())
			}
			lines := strings.Split(strings.TrimSpace(logs.String()), "\n")[before:]
			if len(lines) != 1 || !strings.Contains(lines[0], tc.logs) {
				t.Fatalf("want one log line with %q, got %q", tc.logs, lines)
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
