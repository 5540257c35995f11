package redis

import (
	"context"
	"errors"
	"log/slog"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/testing/testredis"
	"github.com/policyd-mail/policyd/store"
	"github.com/policyd-mail/policyd/store/storetest"
)

// open opens a Store on url for the test and closes it when it ends.
func open(t testing.TB, url string, opts Options) *Store {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = testLogger(t)
	}
	s, err := Open(url, opts)
	if err != nil {
		t.Fatalf("Open(%q): %v", url, err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return s
}

// testLogger writes the store's log lines into the test's log.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(tlogWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type tlogWriter struct{ t testing.TB }

func (w tlogWriter) Write(p []byte) (int, error) {
	w.t.Log(string(p))
	return len(p), nil
}

// The contract suite against each deployment. Its expiry checks sleep for
// real, about 20s per run, so the three run side by side from goroutines
// (t.Run allows that) rather than as t.Parallel subtests, which -parallel
// (GOMAXPROCS by default) would queue on a small machine.
func TestContract(t *testing.T) {
	var wg sync.WaitGroup
	for _, tc := range []struct {
		name  string
		url   func(t *testing.T) string
		batch bool
	}{
		{"single", func(t *testing.T) string { return testredis.Start(t).URL() }, false},
		{"sentinel", func(t *testing.T) string { return testredis.StartSentinel(t).URL() }, false},
		{"cluster", func(t *testing.T) string { return testredis.StartCluster(t).URL() }, false},
		{"single batched", func(t *testing.T) string { return testredis.Start(t).URL() }, true},
		{"sentinel batched", func(t *testing.T) string { return testredis.StartSentinel(t).URL() }, true},
		{"cluster batched", func(t *testing.T) string { return testredis.StartCluster(t).URL() }, true},
	} {
		wg.Go(func() {
			t.Run(tc.name, func(t *testing.T) {
				url := tc.url(t)
				storetest.Run(t, storetest.Harness{
					// Generous: the suite's concurrency tests queue many
					// calls on a loaded machine, and -race slows it down.
					New: func(t *testing.T) store.Store {
						return open(t, url, Options{Timeout: 2 * time.Second, Batch: tc.batch})
					},
					Advance: func(_ *testing.T, d time.Duration) { time.Sleep(d) },
				})
			})
		})
	}
	wg.Wait()
}

// Two policyd hosts on one Redis count together.
func TestTwoStoresShareCounters(t *testing.T) {
	t.Parallel()
	srv := testredis.Start(t)
	a := open(t, srv.URL(), Options{})
	b := open(t, srv.URL(), Options{})
	ctx := context.Background()
	key := store.Key("192.0.2.1", "test", "shared")
	for i := int64(1); i <= 6; i++ {
		s := a
		if i%2 == 0 {
			s = b
		}
		n, err := s.Incr(ctx, key, 1, time.Minute)
		if err != nil || n != i {
			t.Fatalf("Incr #%d = %d, %v", i, n, err)
		}
	}
	if ok, _, err := a.Acquire(ctx, store.Key("192.0.2.1", "test", "slots"), "host-a:1", 1, time.Now(), time.Minute); !ok || err != nil {
		t.Fatalf("Acquire on a: %v %v", ok, err)
	}
	if ok, held, err := b.Acquire(ctx, store.Key("192.0.2.1", "test", "slots"), "host-b:1", 1, time.Now(), time.Minute); ok || held != 1 || err != nil {
		t.Fatalf("Acquire on b while a holds the only slot = %v, %d, %v", ok, held, err)
	}
}

// Concurrent counting from many goroutines over two stores is exact.
func TestConcurrentTwoStores(t *testing.T) {
	t.Parallel()
	srv := testredis.Start(t)
	stores := []*Store{open(t, srv.URL(), Options{Timeout: time.Second}), open(t, srv.URL(), Options{Timeout: time.Second})}
	key := store.Key("192.0.2.2", "test", "c")
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Go(func() {
			for range 100 {
				if _, err := stores[g%2].Incr(context.Background(), key, 1, time.Minute); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	if got := srv.MustDo("GET", key); got != "800" {
		t.Fatalf("counter = %s, want 800", got)
	}
}

// Values written by this backend are plain Redis types an operator can
// read with redis-cli; the README documents them.
func TestKeyLayout(t *testing.T) {
	t.Parallel()
	srv := testredis.Start(t)
	s := open(t, srv.URL(), Options{})
	ctx := context.Background()
	now := time.UnixMilli(1_790_000_000_000)
	c, h, tl, l := store.Key("192.0.2.3", "r", "c"), store.Key("192.0.2.3", "r", "h"), store.Key("192.0.2.3", "r", "t"), store.Key("192.0.2.3", "r", "l")
	mustNo(t, func() error { _, err := s.Incr(ctx, c, 5, time.Minute); return err })
	mustNo(t, func() error { return s.HIncr(ctx, time.Minute, store.FieldIncr{Key: h, Field: "s", Delta: 2}) })
	mustNo(t, func() error { _, err := s.Tally(ctx, tl, now, time.Hour, time.Minute); return err })
	mustNo(t, func() error { _, _, err := s.Acquire(ctx, l, "m", 1, now, time.Minute); return err })
	for _, tc := range []struct{ cmd, want string }{
		{"TYPE " + c, "string"}, {"GET " + c, "5"},
		{"TYPE " + h, "hash"}, {"HGET " + h + " s", "2"},
		{"TYPE " + tl, "hash"}, {"HGET " + tl + " count", "1"}, {"HGET " + tl + " last", strconv.FormatInt(now.UnixMilli(), 10)},
		{"TYPE " + l, "zset"}, {"ZSCORE " + l + " m", strconv.FormatInt(now.Add(time.Minute).UnixMilli(), 10)},
	} {
		args := strings.Fields(tc.cmd)
		if got := srv.MustDo(args...); got != tc.want {
			t.Errorf("%s = %q, want %q", tc.cmd, got, tc.want)
		}
	}
	for _, k := range []string{c, h, tl, l} {
		pttl, _ := strconv.Atoi(srv.MustDo("PTTL", k))
		if pttl <= 0 || pttl > 60_000 {
			t.Errorf("PTTL %s = %d, want within a minute", k, pttl)
		}
	}
}

func mustNo(t *testing.T, f func() error) {
	t.Helper()
	if err := f(); err != nil {
		t.Fatal(err)
	}
}

// Errors name the operation and the key, and keep the store's sentinels.
func TestErrors(t *testing.T) {
	t.Parallel()
	srv := testredis.Start(t)
	s := open(t, srv.URL(), Options{})
	ctx := context.Background()
	k := store.Key("192.0.2.4", "r", "h")
	mustNo(t, func() error { return s.HIncr(ctx, 0, store.FieldIncr{Key: k, Field: "f", Delta: 1}) })
	_, err := s.Incr(ctx, k, 1, time.Minute)
	if !errors.Is(err, store.ErrWrongType) || err.Error()[:len("redis incr "+k)] != "redis incr "+k {
		t.Fatalf("Incr on a hash: %v", err)
	}
	if !s.Healthy() {
		t.Fatal("a wrong type made the store unhealthy")
	}
}

// singleAndCluster are the deployments a test that cares about slots runs on.
var singleAndCluster = []struct {
	name string
	url  func(t *testing.T) string
}{
	{"single", func(t *testing.T) string { return testredis.Start(t).URL() }},
	{"cluster", func(t *testing.T) string { return testredis.StartCluster(t).URL() }},
}

// Keys of the earlier client_stats shape, as an earlier policyd left
// them in Redis, move to the grammar's keys; counts already under the
// new key are added to, not replaced.
func TestMigrateKeys(t *testing.T) {
	for _, tc := range singleAndCluster {
		t.Run(tc.name, func(t *testing.T) {
			s := open(t, tc.url(t), Options{})
			ctx := context.Background()
			old24 := store.Key("192.0.0.0/8", "client_stats", "192.0.2.0/24")
			old48 := store.Key("2001:db8::/32", "client_stats:1", "2001:db8:1::/48")
			new24 := "policyd:{192.0.0.0/8}:client_stats:@192.0.2.0/24"
			new48 := "policyd:{2001:db8::/32}:client_stats:1:@2001:db8:1::/48"
			mustNo(t, func() error {
				return s.HIncr(ctx, time.Hour, store.FieldIncr{Key: old24, Field: "success", Delta: 3})
			})
			mustNo(t, func() error {
				return s.HIncr(ctx, time.Hour, store.FieldIncr{Key: old48, Field: "permfail", Delta: 2})
			})
			mustNo(t, func() error {
				return s.HIncr(ctx, time.Hour, store.FieldIncr{Key: new48, Field: "permfail", Delta: 5})
			})
			if _, err := s.MigrateKeys(ctx); err != nil {
				t.Fatal(err)
			}
			recs, err := s.HGet(ctx, new24)
			if err != nil || recs[0]["success"] != 3 {
				t.Errorf("%s = %v, %v; want success 3", new24, recs, err)
			}
			recs, err = s.HGet(ctx, new48)
			if err != nil || recs[0]["permfail"] != 7 {
				t.Errorf("%s = %v, %v; want permfail 2+5", new48, recs, err)
			}
			for _, k := range []string{old24, old48} {
				if recs, _ := s.HGet(ctx, k); recs[0] != nil {
					t.Errorf("%s still there: %v", k, recs[0])
				}
			}
			if n, err := s.MigrateKeys(ctx); n != 0 || err != nil {
				t.Errorf("second MigrateKeys = %d, %v; want nothing to do", n, err)
			}
		})
	}
}
