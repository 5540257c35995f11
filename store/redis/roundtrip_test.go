package redis

import (
	"context"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/policyd-mail/policyd/internal/testing/testredis"
	"github.com/policyd-mail/policyd/store"
)

// tripCounter is a go-redis hook counting what the client sends: each
// command and each pipeline (one write, one read) is one round trip.
type tripCounter struct {
	mu    sync.Mutex
	trips []string
}

func (h *tripCounter) DialHook(next goredis.DialHook) goredis.DialHook {
	return func(ctx context.Context, network, addr string) (net.Conn, error) { return next(ctx, network, addr) }
}

func (h *tripCounter) ProcessHook(next goredis.ProcessHook) goredis.ProcessHook {
	return func(ctx context.Context, cmd goredis.Cmder) error {
		h.add(cmd.Name())
		return next(ctx, cmd)
	}
}

func (h *tripCounter) ProcessPipelineHook(next goredis.ProcessPipelineHook) goredis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []goredis.Cmder) error {
		names := make([]string, len(cmds))
		for i, c := range cmds {
			names[i] = c.Name()
		}
		h.add("pipeline(" + strings.Join(names, ",") + ")")
		return next(ctx, cmds)
	}
}

func (h *tripCounter) add(s string) {
	h.mu.Lock()
	h.trips = append(h.trips, s)
	h.mu.Unlock()
}

func (h *tripCounter) take() []string {
	h.mu.Lock()
	defer h.mu.Unlock()
	t := h.trips
	h.trips = nil
	return t
}

// Every operation of the mail path is exactly one round trip: one command
// or one EVALSHA, on a single server and on a Cluster.
func TestOneRoundTripPerOperation(t *testing.T) {
	for _, tc := range singleAndCluster {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := open(t, tc.url(t), Options{Timeout: time.Second})
			h := &tripCounter{}
			s.c.AddHook(h)
			ctx := context.Background()
			now := time.Now()
			k := func(what string) string { return store.Key("192.0.2.20", "rt", what) }
			other := store.Key("198.51.100.1", "rt", "x")
			ops := []struct {
				name string
				call func() error
				want string // the command sent
			}{
				{"Incr with ttl", func() error { _, err := s.Incr(ctx, k("c"), 1, time.Minute); return err }, "evalsha"},
				{"Incr again", func() error { _, err := s.Incr(ctx, k("c"), 1, time.Minute); return err }, "evalsha"},
				{"Incr without ttl", func() error { _, err := s.Incr(ctx, k("n"), 1, 0); return err }, "incrby"},
				{"Get", func() error { _, _, err := s.Get(ctx, k("c")); return err }, "get"},
				{"Get missing", func() error { _, _, err := s.Get(ctx, k("none")); return err }, "get"},
				{"Set", func() error { return s.Set(ctx, k("v"), []byte("x"), time.Minute) }, "set"},
				{"SetNX stores", func() error { _, _, err := s.SetNX(ctx, k("g"), []byte("x"), time.Minute); return err }, "set"},
				{"SetNX exists", func() error { _, _, err := s.SetNX(ctx, k("g"), []byte("y"), time.Minute); return err }, "set"},
				{"HIncr three keys", func() error {
					return s.HIncr(ctx, time.Minute,
						store.FieldIncr{Key: k("n/32"), Field: "s", Delta: 1},
						store.FieldIncr{Key: k("n/24"), Field: "s", Delta: 1},
						store.FieldIncr{Key: k("n/16"), Field: "p", Delta: 1})
				}, "evalsha"},
				{"HGet one", func() error { _, err := s.HGet(ctx, k("n/32")); return err }, "hgetall"},
				{"HGet three", func() error { _, err := s.HGet(ctx, k("n/32"), k("n/24"), k("n/16")); return err }, "evalsha"},
				{"Tally", func() error { _, err := s.Tally(ctx, k("t"), now, time.Hour, time.Minute); return err }, "evalsha"},
				{"Acquire", func() error { _, _, err := s.Acquire(ctx, k("l"), "m", 2, now, time.Minute); return err }, "evalsha"},
				{"Release", func() error { return s.Release(ctx, k("l"), "m") }, "zrem"},
				{"Inspect", func() error { _, _, err := s.Inspect(ctx, k("t")); return err }, "evalsha"},
				{"Delete one tag", func() error { return s.Delete(ctx, k("c"), k("v"), k("g")) }, "del"},
				{"Delete two tags", func() error { return s.Delete(ctx, k("n"), other) }, "pipeline(del,del)"},
			}
			// A new connection starts with HELLO: warm one up first.
			if _, _, err := s.Get(ctx, k("warm")); err != nil {
				t.Fatal(err)
			}
			h.take()
			for _, op := range ops {
				if err := op.call(); err != nil {
					t.Fatalf("%s: %v", op.name, err)
				}
				if got := h.take(); len(got) != 1 || got[0] != op.want {
					t.Errorf("%s sent %v, want one %s", op.name, got, op.want)
				}
			}
		})
	}
}

// Scripts are loaded at Open; after a server loses them (SCRIPT FLUSH, a
// restart), one call pays EVALSHA+EVAL and the next is one trip again.
func TestScriptsReloadOnNoScript(t *testing.T) {
	t.Parallel()
	srv := testredis.Start(t)
	s := open(t, srv.URL(), Options{})
	for _, src := range scriptSources {
		sha := goredis.NewScript(src).Hash()
		if got := srv.MustDo("SCRIPT", "EXISTS", sha); got != "1" {
			t.Fatalf("script %s not loaded at Open", sha)
		}
	}
	h := &tripCounter{}
	s.c.AddHook(h)
	ctx := context.Background()
	key := store.Key("192.0.2.21", "rt", "c")
	if _, _, err := s.Get(ctx, key); err != nil { // the connection's HELLO
		t.Fatal(err)
	}
	h.take()
	srv.MustDo("SCRIPT", "FLUSH")
	for i, want := range [][]string{{"evalsha", "eval"}, {"evalsha"}} {
		n, err := s.Incr(ctx, key, 1, time.Minute)
		if err != nil || n != int64(i+1) {
			t.Fatalf("Incr #%d = %d, %v", i+1, n, err)
		}
		if got := h.take(); strings.Join(got, " ") != strings.Join(want, " ") {
			t.Fatalf("Incr #%d sent %v, want %v", i+1, got, want)
		}
	}
}

// Scan finds keys under a prefix with glob characters in it, and only them.
func TestScanEscapesPrefix(t *testing.T) {
	t.Parallel()
	srv := testredis.Start(t)
	s := open(t, srv.URL(), Options{})
	ctx := context.Background()
	want := store.Key("[ab]", "r", "x")
	decoy := store.Key("a", "r", "x") // matched by the unescaped pattern
	for _, k := range []string{want, decoy} {
		if err := s.Set(ctx, k, []byte("1"), time.Minute); err != nil {
			t.Fatal(err)
		}
	}
	got, err := s.Scan(ctx, store.ClientPrefix("[ab]"))
	if err != nil || len(got) != 1 || got[0] != want {
		t.Fatalf("Scan = %v, %v; want [%s]", got, err, want)
	}
}
