package testmta

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"
)

// IOTimeout bounds every read and write of an SMTP session.
const IOTimeout = 10 * time.Second

// Reply is one SMTP server reply.
type Reply struct {
	// Code is the three-digit reply code, 0 if no reply was read.
	Code int
	// Lines are the reply lines as received, code and separator included
	// ("250-mta.example.test", "250 8BITMIME"), without CRLF.
	Lines []string
}

// String returns the reply lines joined with newlines.
func (r Reply) String() string {
	if len(r.Lines) == 0 {
		return fmt.Sprintf("(no reply, code %d)", r.Code)
	}
	return strings.Join(r.Lines, "\n")
}

// Text returns the text of the reply lines without their codes, joined
// with newlines: "4.7.1 <deny@example.test>: Recipient address rejected: go away".
func (r Reply) Text() string {
	t := make([]string, len(r.Lines))
	for i, l := range r.Lines {
		if len(l) > 4 {
			t[i] = l[4:]
		}
	}
	return strings.Join(t, "\n")
}

// OK reports a 2xx reply.
func (r Reply) OK() bool { return r.Code >= 200 && r.Code < 300 }

// Temp reports a 4xx reply.
func (r Reply) Temp() bool { return r.Code >= 400 && r.Code < 500 }

// Perm reports a 5xx reply.
func (r Reply) Perm() bool { return r.Code >= 500 && r.Code < 600 }

// SMTP is a minimal SMTP client session that exposes every reply code.
type SMTP struct {
	conn     net.Conn
	r        *bufio.Reader
	greeting Reply
}

func newReader(c net.Conn) *bufio.Reader { return bufio.NewReader(c) }

// Session connects to addr (host:port) from the local IP address local
// ("127.0.0.N"; empty lets the kernel choose) and reads the greeting. The
// connection is closed at the end of the test if not before.
func Session(t testing.TB, addr, local string) (*SMTP, error) {
	t.Helper()
	d := net.Dialer{Timeout: IOTimeout}
	if local != "" {
		ip := net.ParseIP(local)
		if ip == nil {
			return nil, fmt.Errorf("testmta: bad local address %q", local)
		}
		d.LocalAddr = &net.TCPAddr{IP: ip}
	}
	c, err := d.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	s := &SMTP{conn: c, r: newReader(c)}
	t.Cleanup(func() { s.Close() })
	s.greeting, err = s.readReply()
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("reading greeting: %w", err)
	}
	return s, nil
}

// LocalAddr returns the client side address of the connection.
func (s *SMTP) LocalAddr() net.Addr { return s.conn.LocalAddr() }

// Greeting returns the server's greeting (normally 220).
func (s *SMTP) Greeting() Reply { return s.greeting }

// Cmd sends one command line (without CRLF) and reads the reply.
func (s *SMTP) Cmd(line string) (Reply, error) {
	if strings.ContainsAny(line, "\r\n") {
		return Reply{}, fmt.Errorf("testmta: command contains CR or LF: %q", line)
	}
	if err := s.write(line + "\r\n"); err != nil {
		return Reply{}, err
	}
	return s.readReply()
}

// Ehlo sends EHLO name.
func (s *SMTP) Ehlo(name string) (Reply, error) { return s.Cmd("EHLO " + name) }

// Helo sends HELO name.
func (s *SMTP) Helo(name string) (Reply, error) { return s.Cmd("HELO " + name) }

// Mail sends MAIL FROM:<from>.
func (s *SMTP) Mail(from string) (Reply, error) { return s.Cmd("MAIL FROM:<" + from + ">") }

// Rcpt sends RCPT TO:<to>.
func (s *SMTP) Rcpt(to string) (Reply, error) { return s.Cmd("RCPT TO:<" + to + ">") }

// Rset sends RSET.
func (s *SMTP) Rset() (Reply, error) { return s.Cmd("RSET") }

// Data sends DATA and, if the server answers 354, the body (line endings
// normalised to CRLF, dot-stuffed) and the terminating ".", and returns the
// reply to the end of data. If DATA is not answered with 354, that reply is
// returned.
func (s *SMTP) Data(body string) (Reply, error) {
	r, err := s.Cmd("DATA")
	if err != nil || r.Code != 354 {
		return r, err
	}
	if err := s.write(dotStuff(body) + ".\r\n"); err != nil {
		return Reply{}, err
	}
	return s.readReply()
}

// Quit sends QUIT and reads the reply. It does not close the connection.
func (s *SMTP) Quit() (Reply, error) { return s.Cmd("QUIT") }

// Close closes the connection.
func (s *SMTP) Close() error { return s.conn.Close() }

// dotStuff turns body into SMTP DATA lines: CRLF line endings, a leading
// "." doubled, and a final CRLF.
func dotStuff(body string) string {
	if body == "" {
		return ""
	}
	body = strings.ReplaceAll(body, "\r\n", "\n")
	body = strings.TrimSuffix(body, "\n")
	var b strings.Builder
	for _, l := range strings.Split(body, "\n") {
		if strings.HasPrefix(l, ".") {
			b.WriteByte('.')
		}
		b.WriteString(l)
		b.WriteString("\r\n")
	}
	return b.String()
}

func (s *SMTP) write(data string) error {
	if err := s.conn.SetWriteDeadline(time.Now().Add(IOTimeout)); err != nil {
		return err
	}
	_, err := io.WriteString(s.conn, data)
	return err
}

// readReply reads one possibly multi-line reply ("250-..." lines up to a
// "250 ..." line).
func (s *SMTP) readReply() (Reply, error) {
	var r Reply
	for {
		if err := s.conn.SetReadDeadline(time.Now().Add(IOTimeout)); err != nil {
			return r, err
		}
		line, err := s.r.ReadString('\n')
		if err != nil {
			if line != "" {
				r.Lines = append(r.Lines, strings.TrimRight(line, "\r\n"))
			}
			if err == io.EOF {
				err = io.ErrUnexpectedEOF
			}
			return r, fmt.Errorf("reading SMTP reply: %w", err)
		}
		line = strings.TrimRight(line, "\r\n")
		r.Lines = append(r.Lines, line)
		if len(line) < 3 {
			return r, fmt.Errorf("malformed SMTP reply line %q", line)
		}
		code, err := strconv.Atoi(line[:3])
		if err != nil || code < 100 || code > 599 {
			return r, fmt.Errorf("malformed SMTP reply line %q", line)
		}
		if r.Code != 0 && code != r.Code {
			return r, fmt.Errorf("reply code changed within a multi-line reply: %q", line)
		}
		r.Code = code
		if len(line) == 3 || line[3] == ' ' {
			return r, nil
		}
		if line[3] != '-' {
			return r, fmt.Errorf("malformed SMTP reply line %q", line)
		}
	}
}
