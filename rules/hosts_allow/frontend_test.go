package hostsallow_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"strconv"
	"strings"
	"testing"
	"time"

	gomilter "github.com/emersion/go-milter"

	"github.com/policyd-mail/policyd/internal/testing/frontendtest"
	"github.com/policyd-mail/policyd/milter"
	"github.com/policyd-mail/policyd/postfixpolicy"
	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/rules/rulestest"
)

// Overlapping milter connections are overlapping SMTP sessions: the
// fourth is refused with 421 while three are open, and closing one (the
// MTA ends the milter connection with the SMTP session) frees its slot.
func TestOverlappingMilterConnections(t *testing.T) {
	h := rulestest.New(t, "hosts_allow max_conn_ip 3", nil)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := milter.New(milter.Config{Clock: h.Clock}, func() *rules.Chain { return h.Chain })
	go srv.Serve(ln)
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.Shutdown(ctx)
	})
	open := func(ip string, port uint16) (*gomilter.ClientSession, string) {
		t.Helper()
		ms := frontendtest.MTA(t, ln.Addr().String())
		a, err := ms.Conn("client.example", gomilter.FamilyInet, port, ip)
		if err != nil {
			t.Fatalf("connect from %s: %v", ip, err)
		}
		return ms, reply(a)
	}
	// waitOpen waits until the server has run the ending hooks of closed
	// connections: it forgets a connection only after them.
	waitOpen := func(n int) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); srv.Open() != n; time.Sleep(time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%d milter connections open, want %d", srv.Open(), n)
			}
		}
	}

	var held []*gomilter.ClientSession
	for i := range 3 {
		ms, got := open("192.0.2.1", uint16(20000+i))
		if got != "continue" {
			t.Fatalf("session %d: %s, want continue", i+1, got)
		}
		held = append(held, ms)
	}
	ms4, got := open("192.0.2.1", 20003)
	if !strings.HasPrefix(got, "421 4.7.0 Too many concurrent connections") {
		t.Fatalf("fourth session: %s, want 421", got)
	}
	other, got := open("192.0.2.2", 20004)
	if got != "continue" {
		t.Fatalf("another client: %s", got)
	}
	// The open sessions go on undisturbed.
	if a, err := held[0].Helo("client.example"); err != nil || reply(a) != "continue" {
		t.Fatalf("HELO on an open session: %v %v", a, err)
	}
	ms4.Close()
	other.Close()
	waitOpen(3)
	ms5, got := open("192.0.2.1", 20005)
	if !strings.HasPrefix(got, "421 ") {
		t.Fatalf("a refused session freed a slot: %s", got)
	}
	held[1].Close()
	waitOpen(3) // two held, plus the refused one still open
	ms6, got := open("192.0.2.1", 20006)
	if got != "continue" {
		t.Fatalf("after a session closed: %s, want continue", got)
	}
	for _, ms := range []*gomilter.ClientSession{ms5, ms6, held[0], held[2]} {
		ms.Close()
	}
	waitOpen(0)
}

func reply(a *gomilter.Action) string {
	if a.Code == gomilter.ActReplyCode {
		return strconv.Itoa(a.SMTPCode) + " " + a.SMTPText
	}
	if a.Code == gomilter.ActContinue {
		return "continue"
	}
	return "action " + string(rune(a.Code))
}

// Sessions that do not overlap get the same answers behind both
// front-ends, as long as the policy front-end's sessions end before the
// next one starts — which, without a disconnect, only the lease does.
func TestBothFrontEndsAgree(t *testing.T) {
	sessions := []frontendtest.Session{
		{Client: "192.0.2.1"},
		{Client: "192.0.2.2", Rcpts: []string{"a@example.test", "b@example.test"}},
		{Client: "192.0.2.1", Advance: 61 * time.Second},
		{Client: "198.51.100.7"},
		{Client: "198.51.100.7"},
		{Client: "203.0.113.1"},
	}
	got := frontendtest.Both(t, "whitelist clients 198.51.100.0/24\nhosts_allow max_conn_ip 1 lease 60 net \"203.0.113.0/24 DENY no mail from here\"", nil, sessions)
	want := []string{
		"rcpt user@example.test: ok; message: ok",
		"rcpt a@example.test: ok; rcpt b@example.test: ok; message: ok",
		"rcpt user@example.test: ok; message: ok",
		"rcpt user@example.test: ok; message: ok",
		"rcpt user@example.test: ok; message: ok",
		"rcpt user@example.test: 5 no mail from here",
	}
	frontendtest.Expect(t, got, want)
}

// The documented difference: the policy protocol never reports a
// disconnect. Sessions one after the other on one policy connection (one
// smtpd process) free their slot as the next begins; a session whose
// connection carries nothing more holds it until the lease runs out.
// (Behind milter each slot is freed when the connection closes:
// TestOverlappingMilterConnections.)
func TestPolicyHoldsSlotsUntilTheSessionEnds(t *testing.T) {
	sessions := []frontendtest.Session{
		{Client: "192.0.2.1"},
		{Client: "192.0.2.1", Advance: 30 * time.Second},
		{Client: "192.0.2.1", Advance: 30 * time.Second},
	}
	got := frontendtest.Policy(t, "hosts_allow max_conn_ip 1 lease 60", nil, sessions)
	for i := range sessions {
		if want := "rcpt user@example.test: ok; message: ok"; got[i].String() != want {
			t.Errorf("policy session %d on one connection: %s\nwant %s", i+1, got[i], want)
		}
	}

	h := rulestest.New(t, "hosts_allow max_conn_ip 1 lease 60", nil)
	srv := postfixpolicy.New(postfixpolicy.Config{Clock: h.Clock}, func() *rules.Chain { return h.Chain })
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go srv.Serve(ln)
	defer srv.Shutdown(context.Background())
	ask := func(port string) string {
		t.Helper()
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(10 * time.Second))
		fmt.Fprintf(c, "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.1\nclient_port=%s\n\n", port)
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(line)
	}
	// Two smtpd processes, one connection each: the first session's
	// connection carries nothing more, so its slot stays taken.
	if got := ask("1"); got != "action=DUNNO" {
		t.Fatalf("first session: %s", got)
	}
	if got := ask("2"); !strings.HasPrefix(got, "action=421 4.7.0 Too many concurrent") {
		t.Fatalf("second session on another connection: %s", got)
	}
	h.Clock.Advance(61 * time.Second)
	if got := ask("3"); got != "action=DUNNO" {
		t.Fatalf("after the lease ran out: %s", got)
	}
}
