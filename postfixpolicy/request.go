// Package postfixpolicy is the Postfix policy delegation front-end
// (check_policy_service): it reads requests, recognises the SMTP session
// they belong to, replays the hooks not yet run for it, and writes the
// chain's decision back as an action= line. It makes no policy choices.
package postfixpolicy

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
)

// Limits bound what one client may make the server hold.
type Limits struct {
	MaxLine    int // bytes per "name=value" line, newline included
	MaxAttrs   int // attributes per request
	MaxRequest int // bytes per request
}

// DefaultLimits are far above what Postfix sends (its longest attributes,
// certificate subjects, stay well under 1 KiB) and far below harm.
var DefaultLimits = Limits{MaxLine: 8 << 10, MaxAttrs: 200, MaxRequest: 64 << 10}

// Protocol errors: each closes the connection without a reply, as
// SMTPD_POLICY_README asks ("in case of trouble the policy server must not
// send a reply"); Postfix then retries or applies its default_action.
var (
	ErrLineTooLong   = errors.New("line too long")
	ErrTooManyAttrs  = errors.New("too many attributes")
	ErrRequestTooBig = errors.New("request too large")
	ErrMalformed     = errors.New("malformed attribute line")
	ErrTruncated     = errors.New("connection closed inside a request")
)

// Request holds the attributes policyd uses; the rest are counted and
// ignored, as the protocol asks.
type Request struct {
	Request        string
	ProtocolState  string
	ProtocolName   string
	HeloName       string
	QueueID        string
	Sender         string
	Recipient      string
	RecipientCount string
	ClientAddress  string
	ClientName     string
	ClientPort     string
	ServerAddress  string
	ServerPort     string
	Instance       string
	SASLUsername   string
	Size           string
	Attrs          int // attributes seen, known or not
}

func (r *Request) reset() { *r = Request{} }

// field maps a known attribute name to its slot and the slot's number
// (see reader.last). A switch on the byte slice converted in place does
// not allocate.
func (r *Request) field(name []byte) (*string, int) {
	switch string(name) {
	case "request":
		return &r.Request, 0
	case "protocol_state":
		return &r.ProtocolState, 1
	case "protocol_name":
		return &r.ProtocolName, 2
	case "helo_name":
		return &r.HeloName, 3
	case "queue_id":
		return &r.QueueID, 4
	case "sender":
		return &r.Sender, 5
	case "recipient":
		return &r.Recipient, 6
	case "recipient_count":
		return &r.RecipientCount, 7
	case "client_address":
		return &r.ClientAddress, 8
	case "client_name":
		return &r.ClientName, 9
	case "client_port":
		return &r.ClientPort, 10
	case "server_address":
		return &r.ServerAddress, 11
	case "server_port":
		return &r.ServerPort, 12
	case "instance":
		return &r.Instance, 13
	case "sasl_username":
		return &r.SASLUsername, 14
	case "size":
		return &r.Size, 15
	}
	return nil, -1
}

const numFields = 16

// common values of the attributes every request carries, so a request
// does not allocate for them.
var common = map[string]string{}

func init() {
	for _, v := range []string{"smtpd_access_policy", "CONNECT", "EHLO", "HELO", "MAIL", "RCPT", "DATA",
		"END-OF-MESSAGE", "VRFY", "ETRN", "SMTP", "ESMTP", "LMTP", "0", "1", "2", "25", "587", "465"} {
		common[v] = v
	}
}

// reader reads requests from one connection within Limits.
type reader struct {
	br     *bufio.Reader
	limits Limits
	// started is called when the first line of a request has arrived, so
	// the caller can switch from the idle deadline to the request one.
	started func()
	// last holds each known attribute's value in the previous request:
	// the requests of one SMTP session repeat most of them (client,
	// helo, sender, instance), and reusing the string saves an
	// allocation each.
	last [numFields]string
}

func newReader(rd io.Reader, l Limits, started func()) *reader {
	// The buffer is the line limit: ReadSlice fails with ErrBufferFull
	// instead of growing, so a 10 MB line costs nothing but its reading.
	return &reader{br: bufio.NewReaderSize(rd, l.MaxLine), limits: l, started: started}
}

// read fills req with the next request. io.EOF means the peer closed
// cleanly between requests.
func (rd *reader) read(req *Request) error {
	req.reset()
	size := 0
	first := true
	for {
		line, err := rd.br.ReadSlice('\n')
		if err != nil {
			switch {
			case errors.Is(err, bufio.ErrBufferFull):
				return fmt.Errorf("%w (over %d bytes)", ErrLineTooLong, rd.limits.MaxLine)
			case errors.Is(err, io.EOF) && first && len(line) == 0:
				return io.EOF
			case errors.Is(err, io.EOF):
				return ErrTruncated
			}
			return err
		}
		if first {
			first = false
			if rd.started != nil {
				rd.started()
			}
		}
		size += len(line)
		if size > rd.limits.MaxRequest {
			return fmt.Errorf("%w (over %d bytes)", ErrRequestTooBig, rd.limits.MaxRequest)
		}
		line = bytes.TrimSuffix(line[:len(line)-1], []byte{'\r'})
		if len(line) == 0 {
			return nil
		}
		req.Attrs++
		if req.Attrs > rd.limits.MaxAttrs {
			return fmt.Errorf("%w (over %d)", ErrTooManyAttrs, rd.limits.MaxAttrs)
		}
		eq := bytes.IndexByte(line, '=')
		if eq <= 0 || bytes.IndexByte(line, 0) >= 0 {
			return fmt.Errorf("%w: %q", ErrMalformed, truncate(line, 40))
		}
		if p, i := req.field(line[:eq]); p != nil && *p == "" {
			// Keep the first of repeated names; Postfix never repeats them.
			*p = rd.value(i, line[eq+1:])
		}
	}
}

// value is v as a string, allocated only when it is neither the slot's
// previous value nor a common one.
func (rd *reader) value(i int, v []byte) string {
	// Comparisons and map lookups of string(v) do not allocate.
	if rd.last[i] == string(v) {
		return rd.last[i]
	}
	s, ok := common[string(v)]
	if !ok {
		s = string(v)
	}
	rd.last[i] = s
	return s
}

func truncate(b []byte, n int) []byte {
	if len(b) > n {
		return b[:n]
	}
	return b
}
