package main

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"io"
	"net"
	"strconv"
	"strings"
	"time"
)

// reqState is where a policy request stands in its session: what Postfix
// knows by then and fills in.
type reqState struct {
	state    string
	msg      int    // the message, from MAIL on
	rcpt     string // RCPT: the recipient asked about
	accepted int    // recipients accepted so far (RCPT) or in all (DATA, END-OF-MESSAGE)
	only     string // DATA, END-OF-MESSAGE: the recipient when there is exactly one
}

// appendRequest encodes one smtpd_access_policy request as Postfix 3.7
// sends it: every attribute, in Postfix's order, empty when not known
// yet, then an empty line.
func (s *session) appendRequest(b []byte, r reqState) []byte {
	attr := func(name, value string) {
		b = append(b, name...)
		b = append(b, '=')
		b = append(b, value...)
		b = append(b, '\n')
	}
	afterHelo := r.state != "CONNECT"
	inMail := afterHelo && r.state != "EHLO"
	// Postfix sets queue_id and instance once MAIL is accepted.
	named := inMail && r.state != "MAIL"
	proto, helo := "SMTP", ""
	if afterHelo {
		proto, helo = "ESMTP", s.c.helo
	}
	var qid, sender, rcpt, inst, size string
	count := "0"
	if inMail {
		sender = s.msgs[r.msg].sender
		size = strconv.Itoa(s.body)
	}
	if named {
		qid, inst = s.queueID(r.msg), s.instance(r.msg)
		count = strconv.Itoa(r.accepted)
		rcpt = r.rcpt
		if r.state != "RCPT" {
			rcpt = r.only
		}
	}
	attr("request", "smtpd_access_policy")
	attr("protocol_state", r.state)
	attr("protocol_name", proto)
	attr("helo_name", helo)
	attr("queue_id", qid)
	attr("sender", sender)
	attr("recipient", rcpt)
	attr("recipient_count", count)
	attr("client_address", s.c.addr.String())
	attr("client_name", s.c.name)
	attr("reverse_client_name", s.c.name)
	attr("instance", inst)
	attr("sasl_method", "")
	attr("sasl_username", "")
	attr("sasl_sender", "")
	attr("size", size)
	attr("ccert_subject", "")
	attr("ccert_issuer", "")
	attr("ccert_fingerprint", "")
	attr("ccert_pubkey_fingerprint", "")
	if s.tls && afterHelo {
		attr("encryption_protocol", "TLSv1.3")
		attr("encryption_cipher", "TLS_AES_256_GCM_SHA384")
		attr("encryption_keysize", "256")
	} else {
		attr("encryption_protocol", "")
		attr("encryption_cipher", "")
		attr("encryption_keysize", "0")
	}
	attr("etrn_domain", "")
	attr("stress", "")
	attr("client_port", strconv.Itoa(s.port))
	attr("policy_context", "")
	attr("server_address", "192.0.2.25")
	attr("server_port", "25")
	attr("compatibility_level", "3.6")
	attr("mail_version", "3.7.11")
	return append(b, '\n')
}

// errStop aborts a session when the run ends; it is not an error.
var errStop = errors.New("run over")

// playPolicy asks the questions of session s at the states in set, in
// order, and follows the answers as Postfix and a client would: a
// refusal at CONNECT or EHLO, or a 421/521 anywhere, ends the session; a
// refused MAIL drops the message; a refused RCPT drops the recipient, and
// a message without recipients gets no DATA.
func playPolicy(s *session, set stateSet, ask func(req []byte) (answer string, err error)) error {
	var buf []byte
	q := func(r reqState) (stop, refused bool, err error) {
		if !set[r.state] {
			return false, false, nil
		}
		buf = s.appendRequest(buf[:0], r)
		a, err := ask(buf)
		if err != nil {
			return true, true, err
		}
		c := classifyAction(a)
		return disconnects(c), refuses(c), nil
	}
	for _, st := range []string{"CONNECT", "EHLO"} {
		if stop, refused, err := q(reqState{state: st}); stop || refused {
			return err
		}
	}
	for m, msg := range s.msgs {
		stop, refused, err := q(reqState{state: "MAIL", msg: m})
		if stop {
			return err
		}
		if refused {
			continue
		}
		var ok []string
		for _, rc := range msg.rcpts {
			stop, refused, err := q(reqState{state: "RCPT", msg: m, rcpt: rc, accepted: len(ok)})
			if stop {
				return err
			}
			if !refused {
				ok = append(ok, rc)
			}
		}
		if len(ok) == 0 {
			continue
		}
		r := reqState{msg: m, accepted: len(ok)}
		if len(ok) == 1 {
			r.only = ok[0]
		}
		for _, st := range []string{"DATA", "END-OF-MESSAGE"} {
			r.state = st
			if stop, refused, err := q(r); stop || refused {
				if stop {
					return err
				}
				break
			}
		}
	}
	return nil
}

// classifyAction names an action for the answer histogram: its SMTP code
// ("450"), else its upper-case word ("DUNNO", "DEFER_IF_PERMIT").
func classifyAction(action string) string {
	w, _, _ := strings.Cut(strings.TrimSpace(action), " ")
	if isCode(w) {
		return w
	}
	return strings.ToUpper(w)
}

func isCode(w string) bool {
	return len(w) == 3 && (w[0] == '4' || w[0] == '5') && w[1] >= '0' && w[1] <= '9' && w[2] >= '0' && w[2] <= '9'
}

// refuses reports whether Postfix refuses the command on this action.
func refuses(class string) bool {
	switch class {
	case "REJECT", "DEFER", "DEFER_IF_PERMIT":
		return true
	}
	return isCode(class)
}

// disconnects reports whether the action ends the SMTP session.
func disconnects(class string) bool { return class == "421" || class == "521" }

// policyConn is one connection to a policy server, kept across sessions
// as each smtpd process keeps its own.
type policyConn struct {
	nc      net.Conn
	br      *bufio.Reader
	timeout time.Duration
}

func dialPolicy(addr string, timeout time.Duration) (*policyConn, error) {
	nc, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return nil, fmt.Errorf("policy dial %s: %w", addr, err)
	}
	return &policyConn{nc: nc, br: bufio.NewReaderSize(nc, 1024), timeout: timeout}, nil
}

// ask sends one request and returns the value of its action= line.
func (c *policyConn) ask(req []byte) (string, error) {
	if err := c.nc.SetDeadline(time.Now().Add(c.timeout)); err != nil {
		return "", fmt.Errorf("policy deadline: %w", err)
	}
	if _, err := c.nc.Write(req); err != nil {
		return "", fmt.Errorf("policy write: %w", err)
	}
	return readReply(c.br)
}

// readReply reads attribute lines up to the empty line and returns the
// action.
func readReply(br *bufio.Reader) (string, error) {
	action, found := "", false
	for {
		line, err := br.ReadSlice('\n')
		if err != nil {
			return "", fmt.Errorf("policy read: %w", err)
		}
		line = bytes.TrimRight(line, "\r\n")
		if len(line) == 0 {
			if !found {
				return "", errors.New("policy reply without action=")
			}
			return action, nil
		}
		if v, ok := bytes.CutPrefix(line, []byte("action=")); ok && !found {
			action, found = string(v), true
		}
	}
}

func (c *policyConn) close() { c.nc.Close() }

// askOnce asks one request on a connection of its own, as Exim's
// ${readsocket} does: connect, send, half-close, read until the server
// closes.
func askOnce(addr string, timeout time.Duration, req []byte) (string, error) {
	nc, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return "", fmt.Errorf("policy dial %s: %w", addr, err)
	}
	defer nc.Close()
	if err := nc.SetDeadline(time.Now().Add(timeout)); err != nil {
		return "", fmt.Errorf("policy deadline: %w", err)
	}
	if _, err := nc.Write(req); err != nil {
		return "", fmt.Errorf("policy write: %w", err)
	}
	if err := nc.(*net.TCPConn).CloseWrite(); err != nil {
		return "", fmt.Errorf("policy half-close: %w", err)
	}
	br := bufio.NewReaderSize(nc, 512)
	a, err := readReply(br)
	if err != nil {
		return "", err
	}
	// The server closes once it has answered.
	if _, err := br.ReadByte(); !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("policy: the server did not close after its answer (%v)", err)
	}
	return a, nil
}
