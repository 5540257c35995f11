package testmta

import (
	"fmt"
	"strings"
	"testing"
	"time"
)

// Step is one command of a Transcript and the server's reply to it.
type Step struct {
	// Cmd is the command sent: "EHLO client.example.test", "MAIL FROM:<a@b>",
	// "RCPT TO:<c@d>", "DATA", "." (end of data; its Reply is the final
	// one), "QUIT".
	Cmd   string
	Reply Reply
}

// Transcript records one SMTP session run by SendMail.
type Transcript struct {
	Local    string // source address the session was opened from
	Greeting Reply
	Steps    []Step
	// Err is the I/O error that ended the session early, if any (for
	// example the server closing the connection after a 421).
	Err error
}

// RcptReplies returns the replies to the RCPT TO commands, in order.
func (tr Transcript) RcptReplies() []Reply {
	var rs []Reply
	for _, s := range tr.Steps {
		if strings.HasPrefix(s.Cmd, "RCPT TO:") {
			rs = append(rs, s.Reply)
		}
	}
	return rs
}

// Reply returns the reply to the first command starting with prefix
// ("MAIL", "DATA", "."), or the zero Reply.
func (tr Transcript) Reply(prefix string) Reply {
	for _, s := range tr.Steps {
		if strings.HasPrefix(s.Cmd, prefix) {
			return s.Reply
		}
	}
	return Reply{}
}

// Final returns the reply to the end of data (the "." after the message),
// or the zero Reply (Code 0) if the message was not sent.
func (tr Transcript) Final() Reply { return tr.Reply(".") }

// String renders the session as C:/S: lines for failure messages.
func (tr Transcript) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "SMTP session from %s:\n", tr.Local)
	for _, l := range tr.Greeting.Lines {
		fmt.Fprintf(&b, "S: %s\n", l)
	}
	for _, s := range tr.Steps {
		if s.Cmd == "." {
			b.WriteString("C: <message>\nC: .\n")
		} else {
			fmt.Fprintf(&b, "C: %s\n", s.Cmd)
		}
		for _, l := range s.Reply.Lines {
			fmt.Fprintf(&b, "S: %s\n", l)
		}
	}
	if tr.Err != nil {
		fmt.Fprintf(&b, "error: %v\n", tr.Err)
	}
	return b.String()
}

// SendMail runs one whole SMTP session against addr from source address
// local: EHLO, MAIL FROM, one RCPT TO per recipient (if MAIL FROM got a
// 2xx reply), DATA with a small message if any recipient got a 2xx reply,
// QUIT. A 421 reply ends the session. Replies are recorded,
// not judged; an I/O error ends the session and is in Transcript.Err.
func SendMail(t testing.TB, addr, local, from string, rcpts []string) Transcript {
	t.Helper()
	return SendMailBody(t, addr, local, from, rcpts, "")
}

// SendMailBody is SendMail with a given message (header and body, "\n" or
// "\r\n" line endings, not dot-stuffed). An empty body means a small
// default message.
func SendMailBody(t testing.TB, addr, local, from string, rcpts []string, body string) Transcript {
	t.Helper()
	if body == "" {
		body = defaultBody(from, rcpts)
	}
	tr := Transcript{Local: local}
	s, err := Session(t, addr, local)
	if err != nil {
		tr.Err = err
		return tr
	}
	defer s.Close()
	tr.Greeting = s.Greeting()
	if tr.Greeting.Code != 220 {
		return tr
	}
	step := func(cmd string, f func() (Reply, error)) (Reply, bool) {
		r, err := f()
		tr.Steps = append(tr.Steps, Step{Cmd: cmd, Reply: r})
		if err != nil {
			tr.Err = err
			return r, false
		}
		return r, r.Code != 421
	}
	if _, ok := step("EHLO client.example.test", func() (Reply, error) { return s.Ehlo("client.example.test") }); !ok {
		return tr
	}
	if r, ok := step("MAIL FROM:<"+from+">", func() (Reply, error) { return s.Mail(from) }); !ok {
		return tr
	} else if !r.OK() {
		step("QUIT", s.Quit)
		return tr
	}
	accepted := 0
	for _, rc := range rcpts {
		r, ok := step("RCPT TO:<"+rc+">", func() (Reply, error) { return s.Rcpt(rc) })
		if !ok {
			return tr
		}
		if r.OK() {
			accepted++
		}
	}
	if accepted > 0 {
		r, ok := step("DATA", func() (Reply, error) { return s.Cmd("DATA") })
		if !ok {
			return tr
		}
		if r.Code == 354 {
			if err := s.write(dotStuff(body) + ".\r\n"); err != nil {
				tr.Err = err
				return tr
			}
			if _, ok := step(".", s.readReply); !ok {
				return tr
			}
		}
	}
	step("QUIT", s.Quit)
	return tr
}

func defaultBody(from string, rcpts []string) string {
	return fmt.Sprintf("From: <%s>\nTo: %s\nSubject: testmta message\nDate: %s\nMessage-ID: <%d.testmta@client.example.test>\n\nHello from testmta.\n",
		from, strings.Join(wrapAngle(rcpts), ", "), time.Now().Format(time.RFC1123Z), time.Now().UnixNano())
}

func wrapAngle(as []string) []string {
	r := make([]string, len(as))
	for i, a := range as {
		r[i] = "<" + a + ">"
	}
	return r
}
