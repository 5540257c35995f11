package main

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/testing/testredis"
	"github.com/policyd-mail/policyd/store"
	redisstore "github.com/policyd-mail/policyd/store/redis"
)

// --store redis://... opens the Redis store, which bounds its own calls,
// and an unreachable Redis does not stop
// start-up: calls fail at once with ErrUnavailable instead.
func TestOpenStoreRedis(t *testing.T) {
	srv := testredis.Start(t)
	o := options{storeURL: srv.URL(), storeTimeout: 100 * time.Millisecond}
	st, err := openStore(o)
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	rs, ok := st.(*redisstore.Store)
	if !ok {
		t.Fatalf("openStore(%s) = %T, want the Redis store itself", o.storeURL, st)
	}
	ctx := context.Background()
	if n, err := rs.Incr(ctx, store.Key("192.0.2.1", "t", "c"), 1, time.Minute); err != nil || n != 1 || !rs.Healthy() {
		t.Fatalf("Incr = %d, %v; healthy %v", n, err, rs.Healthy())
	}

	srv.Stop()
	start := time.Now()
	down, err := openStore(o)
	if err != nil {
		t.Fatalf("openStore with Redis down: %v", err)
	}
	defer down.Close()
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("openStore with Redis down took %v", d)
	}
	if down.(*redisstore.Store).Healthy() {
		t.Fatal("healthy with Redis down")
	}
	start = time.Now()
	if _, err := down.Incr(ctx, store.Key("192.0.2.1", "t", "c"), 1, time.Minute); !errors.Is(err, store.ErrUnavailable) || time.Since(start) > 50*time.Millisecond {
		t.Fatalf("Incr with Redis down: %v after %v", err, time.Since(start))
	}
}
