package maillog

import (
	"bufio"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"
)

// rebuild reads a file through the parser and the rebuilder.
func rebuild(t *testing.T, name string) (sessions []*Session, bad int) {
	t.Helper()
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := Parser{Year: 2026}
	rb := NewRebuilder(10 * time.Minute)
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 0, 64<<10), 1<<20)
	for sc.Scan() {
		e, err := p.Parse(sc.Text())
		switch {
		case errors.Is(err, ErrNotPostfix):
			continue
		case err != nil:
			bad++
			continue
		}
		done, err := rb.Add(e)
		if err != nil {
			bad++
		}
		sessions = append(sessions, done...)
	}
	return append(sessions, rb.Flush()...), bad
}

// summary is what a log says, in one comparable string.
func summary(ss []*Session) string {
	var b strings.Builder
	for _, s := range ss {
		fmt.Fprintf(&b, "%s %s %s-%s:", s.Client, s.ClientName, s.Start.Format("15:04:05"), s.End.Format("15:04:05"))
		for _, m := range s.Messages {
			fmt.Fprintf(&b, " [%s <%s> %d", m.QueueID, m.Sender, m.Size)
			for _, r := range m.Rcpts {
				fmt.Fprintf(&b, " %s", r.Addr)
			}
			b.WriteString("]")
		}
		b.WriteString("\n")
	}
	return b.String()
}

// The real Postfix's log in each timestamp form gives the same sessions.
func TestFormatsAgree(t *testing.T) {
	want, bad := rebuild(t, "testdata/maillog_file.log")
	if bad != 0 || len(want) != 8 {
		t.Fatalf("maillog_file.log: %d sessions, %d lines not understood", len(want), bad)
	}
	msgs, rcpts := 0, 0
	for _, s := range want {
		msgs += len(s.Messages)
		for _, m := range s.Messages {
			rcpts += len(m.Rcpts)
			if m.Sender == "" || m.Size == 0 || m.Queued.IsZero() {
				t.Errorf("message %s lacks what qmgr logged: %+v", m.QueueID, m)
			}
		}
	}
	if msgs != 7 || rcpts != 10 || want[1].Client.String() != "127.0.0.61" || want[1].ClientName != "unknown" {
		t.Fatalf("%d messages, %d recipients:\n%s", msgs, rcpts, summary(want))
	}
	for _, f := range []string{"testdata/syslog.log", "testdata/rfc3339.log"} {
		got, bad := rebuild(t, f)
		if bad != 0 || summary(got) != summary(want) {
			t.Errorf("%s (%d lines not understood):\n%s\nwant\n%s", f, bad, summary(got), summary(want))
		}
	}
}

func TestParseLines(t *testing.T) {
	for _, tc := range []struct {
		line    string
		service string // "" when not Postfix's
		bad     bool   // looks like Postfix's, does not parse
	}{
		{"Dec  4 14:07:45 mx postfix/smtpd[123]: connect from a.example[192.0.2.1]", "smtpd", false},
		{"Dec 04 14:07:45 mx postfix-out/qmgr[9]: ABC: removed", "qmgr", false},
		{"2026-12-04T14:07:45+01:00 mx postfix/cleanup[1]: ABC: message-id=<x>", "cleanup", false},
		{"2026-12-04T14:07:45.5 mx postfix/smtp[1]: ABC: to=<x>", "smtp", false},
		{"Dec  4 14:07:45 mx CRON[1]: (root) CMD (x)", "", false},
		{"Dec  4 14:07:45 mx postfix/nonsense[1]: x", "", false},
		{"\x00\x01\xff\xfe binary", "", false},
		{"", "", false},
		{"Dec  4 14:07", "", false},
		{"Dec  4 14:07 mx postfix/smtpd[1]: truncated time", "", true},
		{"Xyz  4 14:07:45 mx postfix/smtpd[1]: bad month", "", true},
		{"Dec  4 14:07:45 mx postfix/smtpd[x]: bad pid", "", true},
		{"Dec  4 14:07:45 mx postfix/smtpd[1]" + strings.Repeat("x", MaxLine), "", true},
	} {
		var p Parser
		p.Year = 2026
		e, err := p.Parse(tc.line)
		switch {
		case tc.service != "":
			if err != nil || e.Service != tc.service {
				t.Errorf("%.60q: %v %+v", tc.line, err, e)
			}
		case tc.bad:
			if err == nil || errors.Is(err, ErrNotPostfix) {
				t.Errorf("%.60q: want a parse error, got %v", tc.line, err)
			}
		default:
			if !errors.Is(err, ErrNotPostfix) {
				t.Errorf("%.60q: want ErrNotPostfix, got %v", tc.line, err)
			}
		}
	}
}

// A traditional timestamp has no year: the log's rolls over at New Year.
func TestNewYear(t *testing.T) {
	p := Parser{Year: 2026}
	a, _ := p.Parse("Dec 31 23:59:59 mx postfix/smtpd[1]: connect from a[192.0.2.1]")
	b, _ := p.Parse("Jan  1 00:00:01 mx postfix/smtpd[1]: disconnect from a[192.0.2.1]")
	if a.Time.Year() != 2026 || b.Time.Year() != 2027 || b.Time.Sub(a.Time) != 2*time.Second {
		t.Fatalf("%v then %v", a.Time, b.Time)
	}
	// Lines of one second may come out of order across midnight.
	c, _ := p.Parse("Dec 31 23:59:59 mx postfix/qmgr[2]: Q: removed")
	d, _ := p.Parse("Jan  1 00:00:02 mx postfix/smtpd[1]: connect from a[192.0.2.1]")
	if c.Time != a.Time || d.Time.Year() != 2027 {
		t.Fatalf("out of order: %v then %v", c.Time, d.Time)
	}
}

// Postfix's refusals: the recipient refused, with the reply and the HELO
// it logs; a malformed smtpd line is an error and loses nothing else.
func TestRejectsAndDamage(t *testing.T) {
	lines := []string{
		"Dec  4 14:07:45 mx postfix/smtpd[7]: connect from c.example[192.0.2.9]",
		"Dec  4 14:07:46 mx postfix/smtpd[7]: NOQUEUE: reject: RCPT from c.example[192.0.2.9]: 554 5.7.1 <x@example.test>: Relay access denied; from=<s@example.org> to=<x@example.test> proto=ESMTP helo=<c.example>",
		"Dec  4 14:07:46 mx postfix/smtpd[7]: NOQUEUE: reject: RCPT from c.example[192.0.2.9]: 554 5.7.1 no separator here",
		"Dec  4 14:07:47 mx postfix/smtpd[7]: Q1: client=c.example[192.0.2.9], sasl_method=PLAIN, sasl_username=alice",
		"Dec  4 14:07:48 mx postfix/smtpd[7]: connect from garbage",
		"Dec  4 14:07:48 mx postfix/qmgr[2]: Q1: from=<s@example.org>, size=999, nrcpt=1 (queue active)",
		"Dec  4 14:07:49 mx postfix/smtpd[7]: disconnect from c.example[192.0.2.9] ehlo=1 mail=1 rcpt=1/2 data=1 quit=1 commands=5/6",
		"Dec  4 14:07:50 mx postfix/smtp[3]: Q1: to=<y@example.net>, relay=mx.example.net[198.51.100.1]:25, delay=1, status=deferred (timeout)",
		"Dec  4 14:17:50 mx postfix/smtp[3]: Q1: to=<y@example.net>, relay=mx.example.net[198.51.100.1]:25, delay=601, status=sent (250 ok)",
	}
	p := Parser{Year: 2026}
	rb := NewRebuilder(5 * time.Minute)
	var out []*Session
	errs := 0
	for _, l := range lines {
		e, err := p.Parse(l)
		if err != nil {
			t.Fatalf("%q: %v", l, err)
		}
		done, err := rb.Add(e)
		if err != nil {
			errs++
		}
		out = append(out, done...)
		if len(done) > 0 && !strings.Contains(l, "14:17:50") {
			t.Fatalf("a session came out before its grace ended, at %q", l)
		}
	}
	out = append(out, rb.Flush()...)
	if errs != 2 || len(out) != 1 {
		t.Fatalf("%d errors, %d sessions", errs, len(out))
	}
	s := out[0]
	if s.Helo != "c.example" || s.SASL != "alice" || len(s.Messages) != 2 {
		t.Fatalf("%+v\n%s", s, summary(out))
	}
	refused, queued := s.Messages[0], s.Messages[1]
	if refused.QueueID != "" || len(refused.Rcpts) != 1 || !refused.Rcpts[0].Refused ||
		refused.Rcpts[0].Reply != "554 5.7.1 <x@example.test>: Relay access denied" {
		t.Fatalf("refused: %+v", refused)
	}
	if queued.QueueID != "Q1" || queued.Size != 999 || len(queued.Rcpts) != 1 || queued.Rcpts[0].Refused {
		t.Fatalf("queued: %+v", queued)
	}
}

// A session whose disconnect line was lost does not hold the later ones;
// an alias's deliveries stand for the one recipient the client named.
func TestLostDisconnectAndAliases(t *testing.T) {
	p := Parser{Year: 2026}
	rb := NewRebuilder(time.Minute)
	add := func(l string) []*Session {
		t.Helper()
		e, err := p.Parse(l)
		if err != nil {
			t.Fatalf("%q: %v", l, err)
		}
		done, err := rb.Add(e)
		if err != nil {
			t.Fatalf("%q: %v", l, err)
		}
		return done
	}
	add("Dec  4 10:00:00 mx postfix/smtpd[1]: connect from a[192.0.2.1]") // never disconnects
	add("Dec  4 10:00:01 mx postfix/smtpd[2]: connect from b[192.0.2.2]")
	add("Dec  4 10:00:02 mx postfix/smtpd[2]: Q2: client=b[192.0.2.2]")
	add("Dec  4 10:00:03 mx postfix/smtpd[2]: disconnect from b[192.0.2.2] commands=5")
	add("Dec  4 10:00:04 mx postfix/local[3]: Q2: to=<bob@mx.example>, orig_to=<team@example.test>, relay=local, status=sent")
	add("Dec  4 10:00:04 mx postfix/local[3]: Q2: to=<carol@mx.example>, orig_to=<team@example.test>, relay=local, status=sent")
	if n := rb.Pending(); n != 2 {
		t.Fatalf("%d pending", n)
	}
	out := add("Dec  4 13:00:00 mx postfix/smtpd[9]: connect from c[192.0.2.3]")
	if len(out) != 2 || out[0].Client.String() != "192.0.2.1" || out[1].Client.String() != "192.0.2.2" {
		t.Fatalf("released %d sessions after three silent hours", len(out))
	}
	if r := out[1].Messages[0].Rcpts; len(r) != 1 || r[0].Addr != "team@example.test" {
		t.Fatalf("recipients %+v", r)
	}
}
