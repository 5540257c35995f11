package main

import (
	"bufio"
	"errors"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/testing/testnet"
	"github.com/policyd-mail/policyd/internal/testing/testsync"
	"github.com/policyd-mail/policyd/store"
	"github.com/policyd-mail/policyd/store/memory"
)

// A state directory with many clients takes seconds to load. The
// listeners are bound first, so the MTA's connection is taken and its
// request answered once the state is in, instead of being refused (which
// Postfix answers with its default action, a tempfail unless set).
func TestListenersBoundBeforeStateLoads(t *testing.T) {
	state := t.TempDir()
	st, err := memory.Open(memory.Options{Dir: state, SweepInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	for i := range 300_000 {
		a := netip.AddrFrom4([4]byte{10, byte(i >> 16), byte(i >> 8), byte(i)})
		if _, err := st.Incr(t.Context(), store.Key(a.String(), "connection_shaper", "sessions"), 1, time.Hour); err != nil {
			t.Fatal(err)
		}
	}
	st.Close() // writes the snapshot the daemon will load
	cfg := t.TempDir()
	if err := os.WriteFile(filepath.Join(cfg, "plugins"), []byte("connection_shaper threshold 1000\n"), 0o644); err != nil {
		t.Fatal(err)
	}

	// A free port, known before start-up: the test must connect while
	// the daemon is still loading, before it logs its addresses.
	port, err := testnet.FreePort()
	if err != nil {
		t.Fatal(err)
	}
	addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))

	o := parseServe(t, "--config", cfg, "--state-dir", state, "--policy-listen", addr, "--milter-listen", "", "--http-listen", "")
	type result struct {
		d   *daemon
		err error
	}
	started := make(chan result, 1)
	go func() {
		d, err := start(o, slog.New(slog.DiscardHandler))
		started <- result{d, err}
	}()
	var c net.Conn
	for c == nil {
		select {
		case r := <-started:
			if r.d != nil {
				r.d.stop(time.Second)
			}
			t.Fatalf("start-up finished (err %v) before %s took a connection: the listeners were bound after the state was loaded (or another process took the port)", r.err, addr)
		default:
		}
		if c, err = net.DialTimeout("tcp", addr, time.Second); err != nil {
			c = nil
			time.Sleep(time.Millisecond)
		}
	}
	defer c.Close()
	select {
	case r := <-started:
		started <- r
		t.Fatalf("the first connection was taken only once start-up had finished")
	default:
	}
	// The request waits for the load, then gets its answer.
	reply := policyAsk(t, c, bufio.NewReader(c), "protocol_state=RCPT", "client_address=10.0.0.1", "client_port=4000",
		"helo_name=h.example", "sender=s@example.org", "recipient=r@example.test", "instance=a.b.c.1")
	if !strings.HasPrefix(reply, "action=") {
		t.Errorf("reply = %q", reply)
	}
	r := <-started
	if r.err != nil {
		t.Fatal(r.err)
	}
	if err := r.d.stop(5 * time.Second); err != nil {
		t.Error(err)
	}
}

// parseServe builds serve's options from args, as the command line does.
func parseServe(t *testing.T, args ...string) options {
	t.Helper()
	o, err := parseOptions(args, nil)
	if err != nil {
		t.Fatal(err)
	}
	return o
}

// A stop right after start-up, as when a SIGTERM arrived during the state
// load, still closes every listener: the socket file goes, and no
// listener is reported as failed.
func TestStopRightAfterStartClosesListeners(t *testing.T) {
	dir := t.TempDir()
	sock := filepath.Join(dir, "policy.sock")
	var logs testsync.Buffer
	for i := range 20 {
		o := parseServe(t, "--state-dir", filepath.Join(dir, "state"), "--policy-listen", "unix:"+sock, "--milter-listen", "", "--http-listen", "")
		d, err := start(o, slog.New(slog.NewTextHandler(&logs, nil)))
		if err != nil {
			t.Fatal(err)
		}
		if err := d.stop(5 * time.Second); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("round %d: the socket file is still there after stop (%v)", i, err)
		}
	}
	if strings.Contains(logs.String(), "listener failed") {
		t.Errorf("a clean stop logged a failed listener:\n%s", logs.String())
	}
}

// A configuration error stops start-up before the state is loaded (here
// it could not be: another store holds the directory), so the MTA is
// not kept waiting for a load that ends in a refusal.
func TestConfigCheckedBeforeStateLoads(t *testing.T) {
	state := t.TempDir()
	holder, err := memory.Open(memory.Options{Dir: state, SweepInterval: -1})
	if err != nil {
		t.Fatal(err)
	}
	defer holder.Close()
	cfg := t.TempDir()
	if err := os.WriteFile(filepath.Join(cfg, "plugins"), []byte("no_such_rule\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	o := parseServe(t, "--config", cfg, "--state-dir", state, "--policy-listen", "127.0.0.1:0", "--milter-listen", "", "--http-listen", "")
	_, err = start(o, slog.New(slog.DiscardHandler))
	if err == nil || !strings.Contains(err.Error(), "in the configuration") {
		t.Fatalf("start with a bad config and a busy state directory: %v, want the configuration's error", err)
	}
}
