package milter

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"time"

	"github.com/policyd-mail/policyd/internal/listen"
)

// Names of the limits, as counted by Config.LimitHit (the limit label of
// policyd_limit_hits_total).
const (
	LimitPacketSize = "packet_size"     // a packet longer than MaxPacket
	LimitMacros     = "macros"          // more than MaxMacros macros in one packet
	LimitIdleTime   = "idle_time"       // no packet within IdleTimeout
	LimitConnTime   = "connection_time" // a connection open longer than MaxConnTime
	LimitConns      = listen.LimitConns // a connection refused or closed at MaxConns
)

// LimitNames lists every limit this front-end counts, so a counter can
// show each at zero before the first hit.
var LimitNames = []string{LimitPacketSize, LimitMacros, LimitIdleTime, LimitConnTime, LimitConns}

// dropError is why a connection is dropped; limit is empty when the peer
// broke the protocol rather than a limit.
type dropError struct {
	limit  string
	reason string
}

func (e *dropError) Error() string { return "broken milter stream: " + e.reason }

func broken(format string, args ...any) *dropError {
	return &dropError{reason: fmt.Sprintf(format, args...)}
}

// known commands, protocol v2 to v6.
var knownCmd = [256]bool{'A': true, 'B': true, 'C': true, 'D': true, 'E': true, 'H': true, 'K': true, 'L': true,
	'M': true, 'N': true, 'O': true, 'Q': true, 'R': true, 'T': true, 'U': true}

// keepBuf is the largest packet buffer a connection keeps between
// packets: what MTAs send is far smaller, and an idle connection should
// not hold a large one.
const keepBuf = 4 << 10

// next reads one whole packet and checks it before go-milter sees any of
// it. go-milter would make a buffer of any claimed length up to 1 MiB and
// wait for it to fill, keep every macro of a packet in a map, and log
// every broken stream with no bound on the rate; handing it whole, sane
// packets only means a broken peer never reaches it. The error is io.EOF
// for a clean close between packets, else a *dropError.
func (c *conn) next() ([]byte, error) {
	kind := c.deadline()
	if c.br == nil {
		c.br = bufio.NewReaderSize(c.Conn, 4<<10)
	}
	var hdr [4]byte
	if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
		return nil, c.readError(err, kind)
	}
	n := binary.BigEndian.Uint32(hdr[:])
	switch {
	case n == 0:
		return nil, broken("zero-length packet")
	case n > c.srv.cfg.MaxPacket:
		return nil, &dropError{LimitPacketSize, fmt.Sprintf("packet of %d bytes, limit %d", n, c.srv.cfg.MaxPacket)}
	}
	size := 4 + int(n)
	if cap(c.buf) < size {
		c.buf = make([]byte, size)
	}
	pkt := c.buf[:size]
	if size > keepBuf {
		c.buf = nil
	}
	copy(pkt, hdr[:])
	kind = c.deadline()
	if _, err := io.ReadFull(c.br, pkt[4:]); err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF // the header came: this is a truncated packet
		}
		return nil, c.readError(err, kind)
	}
	if err := checkPacket(pkt[4], pkt[5:], c.srv.cfg.MaxMacros); err != nil {
		return nil, err
	}
	// Busy from a command until its reply is written (Write), so the
	// gate never closes a session policyd is answering, or holding a
	// rule's delay for, to make room at the connection cap. An abort has
	// no reply; macros come before their command.
	if pkt[4] == 'M' {
		c.mailSize.Store(mailSize(pkt[5:]))
	}
	switch pkt[4] {
	case 'D':
		c.Touch()
	case 'A':
		c.SetBusy(false)
	default:
		c.SetBusy(true)
	}
	return pkt, nil
}

// deadline sets the read deadline for the next wait, the nearer of the
// idle timeout and the end of the connection's allowed lifetime, and
// says which limit it is.
func (c *conn) deadline() string {
	d, kind := time.Now().Add(c.srv.cfg.IdleTimeout), LimitIdleTime
	if end := c.Born.Add(c.srv.cfg.MaxConnTime); end.Before(d) {
		d, kind = end, LimitConnTime
	}
	_ = c.Conn.SetReadDeadline(d)
	return kind
}

func (c *conn) readError(err error, kind string) error {
	var ne net.Error
	switch {
	case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed):
		// The MTA closed between packets, or shutdown closed the connection.
		return io.EOF
	case errors.Is(err, io.ErrUnexpectedEOF):
		return broken("truncated packet")
	case errors.As(err, &ne) && ne.Timeout():
		if kind == LimitConnTime {
			return &dropError{kind, fmt.Sprintf("connection open for longer than %s", c.srv.cfg.MaxConnTime)}
		}
		return &dropError{kind, fmt.Sprintf("no packet within %s", c.srv.cfg.IdleTimeout)}
	}
	return &dropError{reason: fmt.Sprintf("read: %v", err)}
}

// mailSize reads the SIZE= ESMTP parameter of a MAIL packet's data (the
// address, then NUL-terminated parameters); 0 without a valid one.
func mailSize(data []byte) int64 {
	_, args, _ := bytes.Cut(data, []byte{0})
	for len(args) > 0 {
		var arg []byte
		arg, args, _ = bytes.Cut(args, []byte{0})
		if len(arg) > 5 && bytes.EqualFold(arg[:5], []byte("SIZE=")) {
			n, err := strconv.ParseInt(string(arg[5:]), 10, 64)
			if err != nil || n < 0 {
				return 0
			}
			return n
		}
	}
	return 0
}

// checkPacket checks one packet's command and data.
func checkPacket(cmd byte, data []byte, maxMacros int) error {
	if !knownCmd[cmd] {
		return broken("unknown command byte 0x%02x", cmd)
	}
	switch cmd {
	case 'L', 'B':
		// Header lines and body chunks are negotiated off (Serve): an MTA
		// never sends them, and go-milter would keep every header line
		// until the end of the headers, without a bound.
		return broken("%s packet, which policyd negotiated off", map[byte]string{'L': "header", 'B': "body"}[cmd])
	case 'K':
		// "Quit, new connection" is protocol v6; go-milter speaks v2,
		// knows no such command and logs one line per connection for it.
		return broken("command K (quit, new connection), which milter protocol 2 has not")
	case 'O':
		if len(data) < 12 {
			return broken("short option negotiation")
		}
		// MTAs speak versions 2 to 6; anything else is not an MTA.
		if v := binary.BigEndian.Uint32(data); v < 2 || v > 6 {
			return broken("option negotiation for milter version %d", v)
		}
	case 'D':
		// A stage code, then NUL-terminated names and values.
		if len(data) == 0 {
			return broken("empty macro packet")
		}
		if len(data) > 1 {
			if n := (bytes.Count(data[1:], []byte{0}) + 1) / 2; n > maxMacros {
				return &dropError{LimitMacros, fmt.Sprintf("%d macros in one packet, limit %d", n, maxMacros)}
			}
		}
	}
	return nil
}
