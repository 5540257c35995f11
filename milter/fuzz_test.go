package milter_test

import (
	"bytes"
	"errors"
	"io"
	"log"
	"net"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/milter"
	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/rules/rulestest"
)

// Raw bytes from an MTA-side peer: the front-end never panics and never
// keeps the connection past the bytes it got (the peer closes its side).
func FuzzMilterStream(f *testing.F) {
	f.Add(optneg(6, 0x1ff, 0x1fffff))
	f.Add(append(optneg(2, 0x3f, 0), packet('C', []byte("host\x004\x00\x10192.0.2.1\x00"))...))
	f.Add(append(append(optneg(6, 0, 0), packet('H', []byte("helo\x00"))...), packet('M', []byte("<a@b>\x00"))...))
	f.Add([]byte{0xff, 0xff, 0xff, 0xff})
	f.Add(packet('D', []byte("Ci\x00Q1\x00")))
	log.SetOutput(io.Discard)
	h := rulestest.New(f, "connection_shaper threshold 2", nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		f.Fatal(err)
	}
	srv := milter.New(milter.Config{Clock: h.Clock, IdleTimeout: 5 * time.Second}, func() *rules.Chain { return h.Chain })
	go srv.Serve(ln)
	f.Cleanup(func() { ln.Close() })
	f.Fuzz(func(t *testing.T, in []byte) {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.Write(in)
		c.(*net.TCPConn).CloseWrite()
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		var out bytes.Buffer
		// A reset is a close too (the server hung up on unread bytes);
		// only a timeout means the connection was kept.
		var ne net.Error
		if _, err := io.Copy(&out, c); errors.As(err, &ne) && ne.Timeout() {
			t.Fatalf("connection not closed after the input ended: %v", err)
		}
	})
}
