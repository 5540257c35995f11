package postfixpolicy_test

import (
	"bufio"
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/postfixpolicy"
	"github.com/policyd-mail/policyd/rules"
	_ "github.com/policyd-mail/policyd/rules/all"
	"github.com/policyd-mail/policyd/rules/rulestest"
)

// start serves the harness's chain on a loopback port.
func start(t testing.TB, h *rulestest.Harness, cfg postfixpolicy.Config) (*postfixpolicy.Server, string) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg.Clock = h.Clock
	srv := postfixpolicy.New(cfg, func() *rules.Chain { return h.Chain })
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := srv.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return srv, ln.Addr().String()
}

// client is one Postfix-side policy connection.
type client struct {
	t  testing.TB
	c  net.Conn
	br *bufio.Reader
}

func dial(t testing.TB, addr string) *client {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &client{t: t, c: c, br: bufio.NewReader(c)}
}

// ask sends one request made of attrs and returns the action.
func (cl *client) ask(attrs ...string) string {
	cl.t.Helper()
	var b strings.Builder
	b.WriteString("request=smtpd_access_policy\n")
	for _, a := range attrs {
		b.WriteString(a)
		b.WriteByte('\n')
	}
	b.WriteByte('\n')
	_ = cl.c.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := cl.c.Write([]byte(b.String())); err != nil {
		cl.t.Fatalf("write: %v", err)
	}
	return cl.reply()
}

func (cl *client) reply() string {
	cl.t.Helper()
	line, err := cl.br.ReadString('\n')
	if err != nil {
		cl.t.Fatalf("read reply: %v", err)
	}
	blank, err := cl.br.ReadString('\n')
	if err != nil || blank != "\n" {
		cl.t.Fatalf("reply %q not followed by an empty line (%q, %v)", line, blank, err)
	}
	act, ok := strings.CutPrefix(strings.TrimSuffix(line, "\n"), "action=")
	if !ok {
		cl.t.Fatalf("reply %q is not action=", line)
	}
	return act
}

func TestDialogues(t *testing.T) {
	files, _ := filepath.Glob("testdata/dialogues/*.txt")
	if len(files) == 0 {
		t.Fatal("no dialogues")
	}
	for _, f := range files {
		t.Run(strings.TrimSuffix(filepath.Base(f), ".txt"), func(t *testing.T) { runDialogue(t, f) })
	}
}

func runDialogue(t *testing.T, file string) {
	data, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	var plugins strings.Builder
	files := map[string]string{}
	lines := strings.Split(string(data), "\n")
	// Build the config first: it must exist before the first request.
	for _, l := range lines {
		verb, rest, _ := strings.Cut(l, " ")
		switch verb {
		case "plugins":
			plugins.WriteString(rest + "\n")
		case "file":
			rule, kv, _ := strings.Cut(rest, " ")
			files[rule] += kv + "\n"
		}
	}
	takeTrace()
	h := rulestest.New(t, plugins.String(), files)
	_, addr := start(t, h, postfixpolicy.Config{})
	conns := map[string]*client{}
	cur := "1"
	var pending []string
	for n, l := range lines {
		at := fmt.Sprintf("%s:%d", file, n+1)
		verb, rest, _ := strings.Cut(l, " ")
		switch verb {
		case "", "#", "plugins", "file":
		case "conn":
			cur = rest
		case "advance":
			d, err := time.ParseDuration(rest)
			if err != nil {
				t.Fatalf("%s: %v", at, err)
			}
			h.Clock.Advance(d)
		case "hooks":
			if got := takeTrace(); got != rest {
				t.Errorf("%s: hooks run: %q\n want: %q", at, got, rest)
			}
		case "request":
			if pending != nil {
				t.Fatalf("%s: request before the previous one's action", at)
			}
			pending = strings.Fields(rest)
		case "action":
			if pending == nil {
				t.Fatalf("%s: action without request", at)
			}
			cl := conns[cur]
			if cl == nil {
				cl = dial(t, addr)
				conns[cur] = cl
			}
			if got := cl.ask(pending...); got != rest {
				t.Errorf("%s: action=%s\n want action=%s", at, got, rest)
			}
			pending = nil
		default:
			t.Fatalf("%s: unknown verb %q", at, verb)
		}
	}
	if pending != nil {
		t.Fatalf("%s: last request has no action", file)
	}
}

// An smtpd process serves one session at a time over its own policy
// connection: sessions one after another on one connection leave one
// tracked, and each ends (its disconnect hook runs) as the next begins;
// sessions on connections of their own stay tracked until idle.
func TestConnectionMovingOnEndsItsSession(t *testing.T) {
	h := rulestest.New(t, "connection_shaper threshold 1000", nil)
	srv, addr := start(t, h, postfixpolicy.Config{})
	c := dial(t, addr)
	for port := 1; port <= 10; port++ {
		if got := c.ask("protocol_state=RCPT", "client_address=192.0.2.70", fmt.Sprintf("client_port=%d", port)); got != "DUNNO" {
			t.Fatal(got)
		}
		if n := srv.Sessions(); n != 1 {
			t.Fatalf("after session %d on one connection: %d sessions tracked, want 1", port, n)
		}
	}
	for port := 11; port <= 13; port++ {
		if got := dial(t, addr).ask("protocol_state=RCPT", "client_address=192.0.2.70", fmt.Sprintf("client_port=%d", port)); got != "DUNNO" {
			t.Fatal(got)
		}
	}
	if n := srv.Sessions(); n != 4 {
		t.Fatalf("%d sessions tracked, want 4: the last of the first connection and one per other connection", n)
	}
	// A request the server answers without a session does not end one.
	for _, bad := range [][]string{
		{"protocol_state=BOGUS", "client_address=192.0.2.71", "client_port=1"},
		{"protocol_state=RCPT", "client_address=mx.example", "client_port=1"},
	} {
		if got := c.ask(bad...); got != "DUNNO" {
			t.Fatal(got)
		}
	}
	if n := srv.Sessions(); n != 4 {
		t.Fatalf("after a bad request: %d sessions tracked, want 4", n)
	}
}
