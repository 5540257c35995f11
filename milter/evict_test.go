package milter_test

import (
	"context"
	"net"
	"testing"
	"time"

	gomilter "github.com/emersion/go-milter"

	"github.com/policyd-mail/policyd/milter"
	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/rules/rulestest"
)

type reviewDelay struct{ d time.Duration }

func (r reviewDelay) Helo(context.Context, *rules.Session) (rules.Result, error) {
	return rules.Result{Delay: r.d}, nil
}

func init() {
	rules.Register(rules.Definition{Name: "delay_probe", Setup: func(b *rules.Binder, _ rules.Env) (any, error) {
		return reviewDelay{b.Duration("delay", time.Second, 0, time.Minute)}, nil
	}})
}

// A milter session in the middle of policyd's own delay (a tarpit that
// then continues) is busy, not silent: a newcomer at the cap is the one
// closed. Before, the session was evicted and the MTA got a broken milter
// connection (milter_default_action) instead of "continue".
func TestNotEvictedDuringOwnDelay(t *testing.T) {
	h := rulestest.New(t, "delay_probe delay 1500ms", nil)
	_, addr := serve(t, h, milter.Config{MaxConns: 1, MinIdle: 200 * time.Millisecond})
	a := mta(t, addr)
	defer a.Close()
	if r := reply(a.Conn("client.example", gomilter.FamilyInet, 4000, "192.0.2.9")); r != "c" {
		t.Fatalf("connect: %s", r)
	}
	res := make(chan string, 1)
	go func() { res <- reply(a.Helo("client.example")) }() // held 1.5 s by the rule
	time.Sleep(500 * time.Millisecond)
	b, err := net.Dial("tcp", addr) // another SMTP session at the cap
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	waitClosed(t, b)
	if r := <-res; r != "c" {
		t.Errorf("helo of the session in policyd's own delay: %s, want c (continue)", r)
	}
}

// A session in DATA: with headers and body negotiated off, the MTA sends
// nothing while the client uploads the message. An open transaction keeps
// it busy; before, it was evicted at the cap and its message refused by
// the MTA's milter_default_action at end of data.
func TestNotEvictedDuringData(t *testing.T) {
	h := rulestest.New(t, "connection_shaper threshold 1000", nil)
	_, addr := serve(t, h, milter.Config{MaxConns: 1, MinIdle: 200 * time.Millisecond})
	a := mta(t, addr)
	defer a.Close()
	reply(a.Conn("client.example", gomilter.FamilyInet, 4000, "192.0.2.9"))
	reply(a.Helo("client.example"))
	reply(a.Mail("<s@example.org>", nil))
	reply(a.Rcpt("<r@example.test>", nil))
	if r := reply(a.HeaderEnd()); r != "c" {
		t.Fatalf("eoh: %s", r)
	}
	time.Sleep(400 * time.Millisecond) // the body is being uploaded
	// A newcomer at the cap finds no idle session to replace: it is the
	// one closed.
	b, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	waitClosed(t, b)
	_, act, err := a.End()
	if err != nil || act.Code != gomilter.ActContinue {
		t.Errorf("end of message of the session in DATA: %v %v", act, err)
	}
}
