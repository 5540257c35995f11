package milter

import (
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/listen"
	"github.com/policyd-mail/policyd/internal/testing/testsync"
	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/rules/rulestest"
)

func rawPacket(cmd byte, data []byte) []byte {
	out := binary.BigEndian.AppendUint32(nil, uint32(len(data)+1))
	return append(append(out, cmd), data...)
}

// A peer that sends the most macros per packet, each as large as a packet
// allows, over and over: what the connection keeps stays within
// maxMacroBytes. Before, 256 values of 64 KiB were kept per connection
// (16 GiB at the connection cap).
func TestMacroBytesBounded(t *testing.T) {
	h := rulestest.New(t, "connection_shaper threshold 1000", nil)
	srv := New(Config{}, func() *rules.Chain { return h.Chain })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Shutdown(context.Background())
	nc, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	opt := binary.BigEndian.AppendUint32(nil, 2)
	opt = binary.BigEndian.AppendUint32(opt, 0)
	opt = binary.BigEndian.AppendUint32(opt, 0)
	nc.Write(rawPacket('O', opt))
	// go-milter hands a command the macros of its own packet only, so
	// the flood is a macro packet before each of many HELOs.
	nc.Write(rawPacket('C', []byte("client.example\x004\x00\x0019\x00192.0.2.1\x00")))
	value := strings.Repeat("v", 60<<10)
	const helos = 64
	for i := range helos {
		d := fmt.Appendf([]byte{'H'}, "{m%d}\x00%s\x00", i, value)
		if _, err := nc.Write(append(rawPacket('D', d), rawPacket('H', []byte("helo.example\x00"))...)); err != nil {
			t.Fatal(err)
		}
	}
	// One reply per command (connect and each HELO): all were read.
	nc.SetReadDeadline(time.Now().Add(10 * time.Second))
	for i := range helos + 1 {
		var hdr [4]byte
		if _, err := io.ReadFull(nc, hdr[:]); err != nil {
			t.Fatalf("reply %d: %v", i, err)
		}
		if _, err := io.CopyN(io.Discard, nc, int64(binary.BigEndian.Uint32(hdr[:]))); err != nil {
			t.Fatalf("reply %d: %v", i, err)
		}
	}
	if n := srv.Open(); n != 1 {
		t.Fatalf("%d connections open, want the one", n)
	}
	srv.gate.Each(func(gc *listen.Conn) {
		m := gc.Owner.(*conn).sess.Load()
		m.mu.Lock()
		n, kept := m.macroBytes, len(m.macros)
		m.mu.Unlock()
		if n > maxMacroBytes {
			t.Errorf("the connection keeps %d bytes of macros (%d macros), bound %d", n, kept, maxMacroBytes)
		}
	})
}

// go-milter's own lines reach the log at most once per interval.
func TestLibraryLogRateLimited(t *testing.T) {
	var out testsync.Buffer
	w := LibraryLog(slog.New(slog.NewTextHandler(&out, nil)), time.Hour)
	for range 200 {
		fmt.Fprintf(w, "Error reading milter command: EOF\n")
	}
	if n := strings.Count(out.String(), "\n"); n != 1 {
		t.Errorf("%d lines for 200 writes, want 1:\n%s", n, out.String())
	}
}
