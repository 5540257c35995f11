package spamthrottle_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	gomilter "github.com/emersion/go-milter"

	"github.com/policyd-mail/policyd/internal/testing/frontendtest"
	"github.com/policyd-mail/policyd/milter"
	"github.com/policyd-mail/policyd/postfixpolicy"
	"github.com/policyd-mail/policyd/rules"
	_ "github.com/policyd-mail/policyd/rules/connection_shaper"
	"github.com/policyd-mail/policyd/store/memory"
)

// A delay never changes what the client is told: the same scenario gives
// the same answers behind both front-ends, with another rule refusing
// after the throttle. (frontendtest caps holds to 1ms; the delays
// themselves are checked by TestSpamthrottle and measured below.)
func TestBothFrontEndsAgree(t *testing.T) {
	var sessions []frontendtest.Session
	for range 4 {
		sessions = append(sessions, frontendtest.Session{Client: "192.0.2.1", Rcpts: []string{"a@example.test", "b@example.test", "c@example.test"}})
	}
	sessions = append(sessions, frontendtest.Session{Client: "198.51.100.7"}, frontendtest.Session{Client: "203.0.113.9", Advance: time.Hour})
	files := map[string]string{"spamthrottle": "::100:400::1:::\n198.51.100.::0::::::\n"}
	got := frontendtest.Both(t, "spamthrottle\nconnection_shaper threshold 3", files, sessions)
	ok3 := "rcpt a@example.test: ok; rcpt b@example.test: ok; rcpt c@example.test: ok; message: ok"
	want := []string{ok3, ok3, ok3,
		"rcpt a@example.test: 4 Too many connections from your address (more than 3 in 1m0s), please try again later; " +
			"rcpt b@example.test: 4 Too many connections from your address (more than 3 in 1m0s), please try again later; " +
			"rcpt c@example.test: 4 Too many connections from your address (more than 3 in 1m0s), please try again later",
		"rcpt user@example.test: ok; message: ok",
		"rcpt user@example.test: ok; message: ok",
	}
	frontendtest.Expect(t, got, want)
}

// measured is the scenario of the delay measurements: one client sending
// as fast as it is let, then a client of a block with st 0.
var measured = []struct {
	ip   string
	want time.Duration
}{
	{"192.0.2.1", 100 * ms},
	{"192.0.2.1", 200 * ms},
	{"192.0.2.1", 400 * ms},
	{"192.0.2.1", 400 * ms}, // stmax
	{"198.51.100.7", 0},
	{"198.51.100.7", 0},
}

// slack is how much later than asked a reply may come: a few loopback
// round trips, with room for a loaded machine under -race. It is kept
// under every step of the scenario so that a wrong delay cannot pass.
const slack = 90 * ms

// realChain builds the scenario's chain on real time.
func realChain(t *testing.T) *rules.Chain {
	t.Helper()
	st := memory.New(memory.Options{})
	t.Cleanup(func() { st.Close() })
	fsys := fstest.MapFS{
		"plugins":      {Data: []byte("spamthrottle\n")},
		"spamthrottle": {Data: []byte("::100:400:::::\n198.51.100.::0::::::\n")},
	}
	c, _, err := rules.Load(fsys, "config", rules.Options{Store: st, Clock: rules.SystemClock{}})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func checkMeasured(t *testing.T, i int, got time.Duration) {
	t.Helper()
	m := measured[i]
	if got < m.want || got >= m.want+slack {
		t.Errorf("message %d from %s held %v, want %v (+%v)", i+1, m.ip, got, m.want, slack)
	}
}

// The delays, measured on the wire: milter holds its reply to the first
// content event (end of headers).
func TestDelaysMeasuredOverMilter(t *testing.T) {
	c := realChain(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := milter.New(milter.Config{MaxContentDelay: 5 * time.Second}, func() *rules.Chain { return c })
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Shutdown(context.Background()) })
	for i, m := range measured {
		ms := frontendtest.MTA(t, ln.Addr().String())
		steps := []func() (*gomilter.Action, error){
			func() (*gomilter.Action, error) {
				return ms.Conn("client.example", gomilter.FamilyInet, uint16(30000+i), m.ip)
			},
			func() (*gomilter.Action, error) { return ms.Helo("client.example") },
			func() (*gomilter.Action, error) { return ms.Mail("<a@example.org>", nil) },
			func() (*gomilter.Action, error) { return ms.Rcpt("<b@example.test>", nil) },
		}
		for _, step := range steps {
			if a, err := step(); err != nil || a.Code != gomilter.ActContinue {
				t.Fatalf("message %d: %v %v", i+1, a, err)
			}
		}
		start := time.Now()
		a, err := ms.HeaderEnd()
		held := time.Since(start)
		if err != nil || a.Code != gomilter.ActContinue {
			t.Fatalf("message %d: end of headers: %v %v", i+1, a, err)
		}
		checkMeasured(t, i, held)
		if _, a, err := ms.End(); err != nil || a.Code != gomilter.ActContinue {
			t.Fatalf("message %d: end of message: %v %v", i+1, a, err)
		}
		ms.Close()
	}
}

// The same over the policy protocol: the reply to the DATA request is
// held, before the client may send its message.
func TestDelaysMeasuredOverPolicy(t *testing.T) {
	c := realChain(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := postfixpolicy.New(postfixpolicy.Config{MaxDelay: 5 * time.Second}, func() *rules.Chain { return c })
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Shutdown(context.Background()) })
	conn, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	br := bufio.NewReader(conn)
	ask := func(attrs ...string) string {
		t.Helper()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(conn, "request=smtpd_access_policy\n%s\n\n", strings.Join(attrs, "\n"))
		var reply string
		for {
			line, err := br.ReadString('\n')
			if err != nil {
				t.Fatalf("policy reply: %v", err)
			}
			if line == "\n" {
				return reply
			}
			reply = strings.TrimSpace(line)
		}
	}
	for i, m := range measured {
		base := []string{"client_address=" + m.ip, fmt.Sprintf("client_port=%d", 30000+i), "helo_name=client.example",
			"sender=a@example.org", fmt.Sprintf("instance=2a.%x.0.0", i)}
		if a := ask(append(base, "protocol_state=RCPT", "recipient=b@example.test")...); a != "action=DUNNO" {
			t.Fatalf("message %d: RCPT: %s", i+1, a)
		}
		start := time.Now()
		a := ask(append(base, "protocol_state=DATA", "recipient_count=1")...)
		held := time.Since(start)
		if a != "action=DUNNO" {
			t.Fatalf("message %d: DATA: %s", i+1, a)
		}
		checkMeasured(t, i, held)
		if a := ask(append(base, "protocol_state=END-OF-MESSAGE", "recipient_count=1")...); a != "action=DUNNO" {
			t.Fatalf("message %d: END-OF-MESSAGE: %s", i+1, a)
		}
	}
}
