package main

import (
	"fmt"
	"net"
	"strconv"
	"strings"
	"time"

	gomilter "github.com/emersion/go-milter"
)

// milterClient opens one milter connection per session, as Postfix does
// per SMTP session. It offers protocol v2 options only: go-milter's
// server speaks v2, and its client gives up on a v6 offer with more.
func milterClient(addr string, timeout time.Duration) *gomilter.Client {
	return gomilter.NewClientWithOptions("tcp", addr, gomilter.ClientOptions{
		Dialer:      &net.Dialer{Timeout: timeout},
		ReadTimeout: timeout, WriteTimeout: timeout,
		ActionMask: gomilter.OptAddHeader | gomilter.OptChangeHeader,
	})
}

// milterStep is one answered milter command.
type milterStep func() (*gomilter.Action, error)

// playMilter runs session s over one milter session as Postfix would
// (its default macros at each stage; an ABORT after each message) and
// follows the answers as playPolicy does. Every answered command is
// passed to answered; the session's answer is its first refusal, else
// the end-of-message answer.
func playMilter(s *session, ms *gomilter.ClientSession, body []byte, answered func(act *gomilter.Action)) (string, error) {
	final := "continue"
	// A macro packet has no answer: a failed write shows at the command
	// that follows it, which do reports.
	var macroErr error
	mac := func(code gomilter.Code, kv ...string) {
		if err := ms.Macros(code, kv...); err != nil && macroErr == nil {
			macroErr = err
		}
	}
	// do runs one command; stop: end the session, refused: skip on.
	do := func(what string, f milterStep) (stop, refused bool, err error) {
		if macroErr != nil {
			return true, true, fmt.Errorf("milter macros before %s: %w", what, macroErr)
		}
		act, err := f()
		if err != nil {
			return true, true, fmt.Errorf("milter %s: %w", what, err)
		}
		answered(act)
		c := classifyMilter(act)
		if c == "continue" || c == "accept" {
			return false, false, nil
		}
		if final == "continue" {
			final = c
		}
		return c == "421" || c == "521", true, nil
	}
	addr := s.c.addr.String()
	family := gomilter.FamilyInet
	if s.c.addr.Is6() {
		family = gomilter.FamilyInet6
	}
	mac(gomilter.CodeConn, "j", "mx.example.test", "{daemon_name}", "smtpd", "{daemon_addr}", "192.0.2.25",
		"v", "Postfix 3.7.11", "_", s.c.name+" ["+addr+"]", "{client_addr}", addr,
		"{client_port}", strconv.Itoa(s.port), "{client_name}", s.c.name)
	if stop, refused, err := do("connect", func() (*gomilter.Action, error) { return ms.Conn(s.c.name, family, uint16(s.port), addr) }); stop || refused {
		return final, err
	}
	if s.tls {
		mac(gomilter.CodeHelo, "{tls_version}", "TLSv1.3", "{cipher}", "TLS_AES_256_GCM_SHA384", "{cipher_bits}", "256")
	}
	if stop, refused, err := do("helo", func() (*gomilter.Action, error) { return ms.Helo(s.c.helo) }); stop || refused {
		return final, err
	}
	for m, msg := range s.msgs {
		if m > 0 {
			if err := ms.Abort(); err != nil {
				return final, fmt.Errorf("milter abort: %w", err)
			}
		}
		qid := s.queueID(m)
		domain := msg.sender[strings.IndexByte(msg.sender, '@')+1:]
		mac(gomilter.CodeMail, "i", qid, "{mail_mailer}", "smtp", "{mail_host}", domain, "{mail_addr}", msg.sender)
		stop, refused, err := do("mail", func() (*gomilter.Action, error) {
			return ms.Mail(msg.sender, []string{"SIZE=" + strconv.Itoa(len(body)), "BODY=8BITMIME"})
		})
		if stop {
			return final, err
		}
		if refused {
			continue
		}
		accepted := 0
		for _, rc := range msg.rcpts {
			mac(gomilter.CodeRcpt, "i", qid, "{rcpt_mailer}", "smtp", "{rcpt_host}", "example.test", "{rcpt_addr}", rc)
			stop, refused, err := do("rcpt", func() (*gomilter.Action, error) { return ms.Rcpt(rc, nil) })
			if stop {
				return final, err
			}
			if !refused {
				accepted++
			}
		}
		if accepted == 0 {
			continue
		}
		if stop, refused, err := sendContent(ms, s, m, qid, body, do); stop || refused {
			if stop {
				return final, err
			}
			continue
		}
		var act *gomilter.Action
		stop, _, err = do("end of message", func() (*gomilter.Action, error) {
			if err := ms.Macros(gomilter.CodeEOB, "i", qid); err != nil {
				return nil, err
			}
			_, a, err := ms.End()
			act = a
			return a, err
		})
		if stop {
			return final, err
		}
		if final == "continue" && act != nil {
			final = classifyMilter(act)
		}
	}
	return final, nil
}

// sendContent sends the headers and the body of message m; go-milter's
// client would fake a "continue" for what the milter declined at
// negotiation (policyd asks for neither headers nor body, only the end of
// headers), so that is skipped here and not counted as answered.
func sendContent(ms *gomilter.ClientSession, s *session, m int, qid string, body []byte, do func(string, milterStep) (bool, bool, error)) (stop, refused bool, err error) {
	msg := s.msgs[m]
	hdrs := [][2]string{
		{"Received", "from " + s.c.helo + " (" + s.c.name + " [" + s.c.addr.String() + "]) by mx.example.test (Postfix) with ESMTPS id " + qid},
		{"From", "<" + msg.sender + ">"},
		{"To", "<" + msg.rcpts[0] + ">"},
		{"Subject", "load test message " + strconv.Itoa(s.seqNo)},
		{"Date", "Mon, 04 Nov 2024 10:00:00 +0000"},
		{"Message-ID", "<" + qid + "@" + s.c.helo + ">"},
	}
	for _, h := range hdrs {
		if ms.ProtocolOption(gomilter.OptNoHeaders) {
			break
		}
		if stop, refused, err := do("header", func() (*gomilter.Action, error) { return ms.HeaderField(h[0], " "+h[1]) }); stop || refused {
			return stop, refused, err
		}
	}
	if !ms.ProtocolOption(gomilter.OptNoEOH) {
		if stop, refused, err := do("end of headers", func() (*gomilter.Action, error) {
			if err := ms.Macros(gomilter.CodeEOH, "i", qid); err != nil {
				return nil, err
			}
			return ms.HeaderEnd()
		}); stop || refused {
			return stop, refused, err
		}
	}
	if ms.ProtocolOption(gomilter.OptNoBody) {
		return false, false, nil
	}
	for off := 0; off < len(body); off += gomilter.MaxBodyChunk {
		chunk := body[off:min(off+gomilter.MaxBodyChunk, len(body))]
		act, err := ms.BodyChunk(chunk)
		if err != nil {
			return true, true, fmt.Errorf("milter body: %w", err)
		}
		if act.Code == gomilter.ActSkip {
			break
		}
		if stop, refused, err := do("body", func() (*gomilter.Action, error) { return act, nil }); stop || refused {
			return stop, refused, err
		}
	}
	return false, false, nil
}

// classifyMilter names a milter answer for the histogram: continue,
// accept, reject, tempfail, discard, skip, or the SMTP code of a reply.
func classifyMilter(a *gomilter.Action) string {
	switch a.Code {
	case gomilter.ActContinue:
		return "continue"
	case gomilter.ActAccept:
		return "accept"
	case gomilter.ActReject:
		return "reject"
	case gomilter.ActTempFail:
		return "tempfail"
	case gomilter.ActDiscard:
		return "discard"
	case gomilter.ActSkip:
		return "skip"
	case gomilter.ActReplyCode:
		return strconv.Itoa(a.SMTPCode)
	}
	return fmt.Sprintf("code %q", rune(a.Code))
}

// makeBody is a message body of n bytes in lines of 78 characters.
func makeBody(n int) []byte {
	line := []byte("The quick brown fox jumps over the lazy dog. 0123456789 abcdefghijklmnopqrstuv\r\n")
	b := make([]byte, 0, n)
	for len(b) < n {
		b = append(b, line[:min(len(line), n-len(b))]...)
	}
	return b
}
