// Package frontendtest runs one scenario of SMTP sessions through both
// front-ends — the Postfix policy protocol as Postfix sends it with
// smtpd_delay_reject=yes (everything at RCPT, then DATA and
// END-OF-MESSAGE), and milter as Postfix sends it — so a rule's test can
// show it behaves the same behind either (SPEC §3).
package frontendtest

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	gomilter "github.com/emersion/go-milter"

	"github.com/policyd-mail/policyd/internal/testing/testredis"
	"github.com/policyd-mail/policyd/milter"
	"github.com/policyd-mail/policyd/postfixpolicy"
	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/rules/rulestest"
	redisstore "github.com/policyd-mail/policyd/store/redis"
)

// Session is one SMTP session of a scenario.
type Session struct {
	Client  string        // the client's IP
	Helo    string        // default "client.example"
	From    string        // default "sender@example.org"
	Rcpts   []string      // default one recipient
	NoData  bool          // stop after the recipients
	Auth    string        // SASL login: policy sasl_username, milter {auth_authen}
	Size    int64         // the client's SIZE= at MAIL; policy also sends it as the size at END-OF-MESSAGE
	Advance time.Duration // move the fake clock before the session
}

// Outcome is what the SMTP client saw, normalised so both protocols
// compare: one line per recipient and for the message, "ok" or the
// reply's class digit and text ("4 Too many connections").
type Outcome []string

func (o Outcome) String() string { return strings.Join(o, "; ") }

// Both runs sessions through the policy front-end and the milter
// front-end, each on a fresh chain built from plugins and files, and fails
// t if the outcomes differ. Then it runs both again on a real Redis, each
// on an emptied database, and fails t if Redis changes any outcome. The
// rules compare the times they store (the fake clock's), but Redis
// expires keys on its own clock: a scenario that needs a key to expire
// after Advance calls Policy and Milter itself. It returns the outcomes
// for the caller's own expectations.
func Both(t *testing.T, plugins string, files map[string]string, sessions []Session) []Outcome {
	t.Helper()
	pol := Policy(t, plugins, files, sessions)
	compare(t, sessions, "policy", pol, "milter", Milter(t, plugins, files, sessions))
	srv := testredis.Start(t)
	onRedis := func() rulestest.Options {
		srv.MustDo("FLUSHALL")
		st, err := redisstore.Open(srv.URL(), redisstore.Options{Timeout: 2 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		return rulestest.Options{Store: st}
	}
	compare(t, sessions, "policy", pol, "policy on Redis", PolicyWith(t, plugins, files, sessions, onRedis()))
	compare(t, sessions, "policy", pol, "milter on Redis", MilterWith(t, plugins, files, sessions, onRedis()))
	return pol
}

func compare(t *testing.T, sessions []Session, aName string, a []Outcome, bName string, b []Outcome) {
	t.Helper()
	for i := range sessions {
		if a[i].String() != b[i].String() {
			t.Errorf("session %d (%s): %s and %s differ\n %s: %s\n %s: %s", i+1, sessions[i].Client, aName, bName, aName, a[i], bName, b[i])
		}
	}
}

func (s *Session) defaults() {
	if s.Helo == "" {
		s.Helo = "client.example"
	}
	if s.From == "" {
		s.From = "sender@example.org"
	}
	if len(s.Rcpts) == 0 {
		s.Rcpts = []string{"user@example.test"}
	}
}

// Policy runs the scenario through the policy front-end.
func Policy(t *testing.T, plugins string, files map[string]string, sessions []Session) []Outcome {
	t.Helper()
	return PolicyWith(t, plugins, files, sessions, rulestest.Options{})
}

// PolicyWith is Policy on a harness built with o.
func PolicyWith(t *testing.T, plugins string, files map[string]string, sessions []Session, o rulestest.Options) []Outcome {
	t.Helper()
	h := rulestest.NewWith(t, plugins, files, o)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := postfixpolicy.New(postfixpolicy.Config{Clock: h.Clock, MaxDelay: time.Millisecond}, func() *rules.Chain { return h.Chain })
	go srv.Serve(ln)
	defer srv.Shutdown(context.Background())
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	br := bufio.NewReader(c)
	ask := func(attrs ...string) string {
		t.Helper()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "request=smtpd_access_policy\n%s\n\n", strings.Join(attrs, "\n"))
		line, err := br.ReadString('\n')
		if err != nil {
			t.Fatalf("policy reply: %v", err)
		}
		br.ReadString('\n')
		return normalise(strings.TrimPrefix(strings.TrimSpace(line), "action="))
	}
	var out []Outcome
	for i, s := range sessions {
		s.defaults()
		h.Clock.Advance(s.Advance)
		base := []string{"client_address=" + s.Client, "client_port=" + strconv.Itoa(10000+i), "helo_name=" + s.Helo,
			"sender=" + s.From, "instance=" + fmt.Sprintf("1f.%x.0.0", i), "sasl_username=" + s.Auth, "size=" + strconv.FormatInt(s.Size, 10)}
		var o Outcome
		accepted := 0
		for _, r := range s.Rcpts {
			a := ask(append(base, "protocol_state=RCPT", "recipient="+r)...)
			o = append(o, "rcpt "+r+": "+a)
			if a == "ok" {
				accepted++
			}
		}
		if !s.NoData && accepted > 0 {
			a := ask(append(base, "protocol_state=DATA", "recipient_count="+strconv.Itoa(accepted))...)
			if a == "ok" {
				a = ask(append(base, "protocol_state=END-OF-MESSAGE", "recipient_count="+strconv.Itoa(accepted))...)
			}
			o = append(o, "message: "+a)
		}
		out = append(out, o)
	}
	return out
}

// normalise turns "DUNNO" into "ok" and "450 4.7.1 text" into "4 text".
func normalise(reply string) string {
	if reply == "DUNNO" || reply == "" {
		return "ok"
	}
	code, rest, _ := strings.Cut(reply, " ")
	if len(code) != 3 {
		return reply
	}
	if f := strings.SplitN(rest, " ", 2); len(f) == 2 && strings.Count(f[0], ".") == 2 {
		rest = f[1]
	}
	return code[:1] + " " + strings.ReplaceAll(rest, "%%", "%")
}

// Milter runs the scenario through the milter front-end, one connection
// per session, refusing what Postfix would refuse: a refused HELO or MAIL
// refuses every recipient of the session.
func Milter(t *testing.T, plugins string, files map[string]string, sessions []Session) []Outcome {
	t.Helper()
	return MilterWith(t, plugins, files, sessions, rulestest.Options{})
}

// MilterWith is Milter on a harness built with o.
func MilterWith(t *testing.T, plugins string, files map[string]string, sessions []Session, o rulestest.Options) []Outcome {
	t.Helper()
	h := rulestest.NewWith(t, plugins, files, o)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := milter.New(milter.Config{Clock: h.Clock, MaxCommandDelay: time.Millisecond, MaxContentDelay: time.Millisecond}, func() *rules.Chain { return h.Chain })
	go srv.Serve(ln)
	defer srv.Shutdown(context.Background())
	var out []Outcome
	for i, s := range sessions {
		s.defaults()
		h.Clock.Advance(s.Advance)
		out = append(out, milterSession(t, ln.Addr().String(), s, i))
		// Sessions are sequential, as in the policy run: wait until the
		// server has ended this one (its disconnect hook has run).
		deadline := time.Now().Add(10 * time.Second)
		for srv.Open() > 0 {
			if time.Now().After(deadline) {
				t.Fatalf("milter session %d still open on the server", i+1)
			}
			runtime.Gosched()
		}
	}
	return out
}

// MTA opens a milter session to addr as an MTA would, with go-milter's
// client: the actions and protocol steps a v2 server accepts, and every
// read and write bounded so a stuck server fails the test.
func MTA(t testing.TB, addr string) *gomilter.ClientSession {
	t.Helper()
	cl := gomilter.NewClientWithOptions("tcp", addr, gomilter.ClientOptions{
		Dialer:      &net.Dialer{Timeout: 5 * time.Second},
		ReadTimeout: 10 * time.Second, WriteTimeout: 10 * time.Second,
		ActionMask: gomilter.OptAddHeader,
	})
	ms, err := cl.Session()
	if err != nil {
		t.Fatalf("milter session with %s: %v", addr, err)
	}
	return ms
}

func milterSession(t *testing.T, addr string, s Session, i int) Outcome {
	t.Helper()
	ms := MTA(t, addr)
	defer ms.Close()
	reply := func(a *gomilter.Action, err error) string {
		t.Helper()
		if err != nil {
			t.Fatalf("milter: %v", err)
		}
		if a.Code == gomilter.ActReplyCode {
			return normalise(strconv.Itoa(a.SMTPCode) + " " + a.SMTPText)
		}
		if a.Code != gomilter.ActContinue {
			return "action " + string(rune(a.Code))
		}
		return "ok"
	}
	var o Outcome
	refuseAll := func(a string) Outcome {
		for _, r := range s.Rcpts {
			o = append(o, "rcpt "+r+": "+a)
		}
		return o
	}
	if a := reply(ms.Conn(s.Helo, gomilter.FamilyInet, uint16(10000+i), s.Client)); a != "ok" {
		return refuseAll(a)
	}
	if a := reply(ms.Helo(s.Helo)); a != "ok" {
		return refuseAll(a) // Postfix gives a HELO-stage reply at MAIL FROM
	}
	macros := []string{"i", fmt.Sprintf("Q%d", i)}
	if s.Auth != "" {
		macros = append(macros, "{auth_authen}", s.Auth)
	}
	ms.Macros(gomilter.CodeMail, macros...)
	var esmtp []string
	if s.Size > 0 {
		esmtp = append(esmtp, "SIZE="+strconv.FormatInt(s.Size, 10))
	}
	if a := reply(ms.Mail("<"+s.From+">", esmtp)); a != "ok" {
		return refuseAll(a)
	}
	accepted := 0
	for _, r := range s.Rcpts {
		a := reply(ms.Rcpt("<"+r+">", nil))
		o = append(o, "rcpt "+r+": "+a)
		if a == "ok" {
			accepted++
		}
	}
	if s.NoData || accepted == 0 {
		ms.Abort()
		return o
	}
	a := reply(ms.HeaderEnd())
	if a == "ok" {
		_, act, err := ms.End()
		a = reply(act, err)
	} else {
		ms.Abort()
	}
	return append(o, "message: "+a)
}

// Expect reports each session whose outcome is not the one wanted.
func Expect(t *testing.T, got []Outcome, want []string) {
	t.Helper()
	for i := range want {
		if got[i].String() != want[i] {
			t.Errorf("session %d: %s\nwant %s", i+1, got[i], want[i])
		}
	}
}
