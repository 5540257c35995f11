package redis

import (
	"context"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/policyd-mail/policyd/internal/testing/testredis"
	"github.com/policyd-mail/policyd/store"
)

const testTimeout = 100 * time.Millisecond

// tripped calls Incr until the breaker answers at once, failing the test
// if that takes more than the configured number of failures.
func tripped(t *testing.T, s *Store, key string) {
	t.Helper()
	for i := 0; ; i++ {
		_, err := s.Incr(context.Background(), key, 1, time.Minute)
		if !errors.Is(err, store.ErrUnavailable) {
			t.Fatalf("Incr #%d while Redis is down: %v, want ErrUnavailable", i+1, err)
		}
		if errors.Is(err, errOpen) {
			if i > s.opt.Failures {
				t.Fatalf("breaker opened after %d failed calls, want %d", i, s.opt.Failures)
			}
			return
		}
		if i > s.opt.Failures {
			t.Fatalf("breaker still closed after %d failed calls", i)
		}
	}
}

// failsFast checks that calls answer ErrUnavailable far within the timeout.
func failsFast(t *testing.T, s *Store, key string) {
	t.Helper()
	for range 100 {
		start := time.Now()
		_, err := s.Incr(context.Background(), key, 1, time.Minute)
		if d := time.Since(start); d > testTimeout/4 {
			t.Fatalf("Incr with the breaker open took %v, want well under %v", d, testTimeout)
		}
		if !errors.Is(err, store.ErrUnavailable) || !errors.Is(err, errOpen) {
			t.Fatalf("Incr with the breaker open: %v", err)
		}
	}
	if s.Healthy() {
		t.Fatal("Healthy() with the breaker open")
	}
}

// recovers waits for calls to succeed again and returns how long it took.
func recovers(t *testing.T, s *Store, key string, within time.Duration) time.Duration {
	t.Helper()
	start := time.Now()
	for {
		_, err := s.Incr(context.Background(), key, 1, time.Minute)
		if err == nil {
			d := time.Since(start)
			if !s.Healthy() {
				t.Fatal("a call went through but Healthy() is false")
			}
			return d
		}
		if !errors.Is(err, store.ErrUnavailable) {
			t.Fatalf("Incr while recovering: %v", err)
		}
		if time.Since(start) > within {
			t.Fatalf("no call went through within %v of Redis coming back: %v", within, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// Redis killed: a few calls fail, then every call fails at once; Redis
// back: counting resumes within 2s.
func TestBreakerServerDown(t *testing.T) {
	t.Parallel()
	bothModes(t, func(t *testing.T, batch bool) {
		srv := testredis.Start(t)
		s := open(t, srv.URL(), Options{Timeout: testTimeout, Batch: batch})
		key := store.Key("192.0.2.10", "test", "c")
		if n, err := s.Incr(context.Background(), key, 1, time.Minute); err != nil || n != 1 {
			t.Fatalf("Incr = %d, %v", n, err)
		}
		srv.Kill()
		tripped(t, s, key)
		failsFast(t, s, key)
		srv.Restart()
		d := recovers(t, s, key, 2*time.Second)
		t.Logf("counting resumed %v after the restart", d)
		// The restarted server is empty: counting starts over, once.
		if got := srv.MustDo("GET", key); got != "1" {
			t.Fatalf("counter after restart = %q, want 1", got)
		}
	})
}

// A hung Redis (stopped process: connections open, no answers): each call
// is bounded by the timeout until the breaker opens, then fails at once.
func TestBreakerServerHung(t *testing.T) {
	t.Parallel()
	bothModes(t, func(t *testing.T, batch bool) {
		srv := testredis.Start(t)
		s := open(t, srv.URL(), Options{Timeout: testTimeout, Batch: batch})
		key := store.Key("192.0.2.11", "test", "c")
		if _, err := s.Incr(context.Background(), key, 1, time.Minute); err != nil {
			t.Fatal(err)
		}
		srv.Pause()
		resumed := false
		defer func() {
			if !resumed {
				srv.Resume()
			}
		}()
		for i := range s.opt.Failures {
			start := time.Now()
			_, err := s.Incr(context.Background(), key, 1, time.Minute)
			d := time.Since(start)
			if !errors.Is(err, store.ErrUnavailable) || errors.Is(err, errOpen) {
				t.Fatalf("Incr #%d on a hung server: %v", i+1, err)
			}
			if d > 3*testTimeout {
				t.Fatalf("Incr #%d on a hung server took %v, timeout %v", i+1, d, testTimeout)
			}
		}
		failsFast(t, s, key)
		srv.Resume()
		resumed = true
		d := recovers(t, s, key, 2*time.Second)
		t.Logf("counting resumed %v after the server did", d)
	})
}

// Open does not fail on an unreachable Redis: the store starts with its
// breaker open and recovers when Redis appears.
func TestOpenWhileDown(t *testing.T) {
	t.Parallel()
	bothModes(t, func(t *testing.T, batch bool) {
		srv := testredis.Start(t)
		srv.Stop()
		s := open(t, srv.URL(), Options{Timeout: testTimeout, Batch: batch})
		key := store.Key("192.0.2.12", "test", "c")
		failsFast(t, s, key)
		srv.Restart()
		recovers(t, s, key, 2*time.Second)
	})
}

// The same for a Cluster none of whose nodes answers at start.
func TestOpenWhileClusterDown(t *testing.T) {
	t.Parallel()
	bothModes(t, func(t *testing.T, batch bool) {
		c := testredis.StartCluster(t)
		for _, n := range c.Nodes {
			n.Stop()
		}
		s := open(t, c.URL(), Options{Timeout: testTimeout, Batch: batch})
		key := store.Key("192.0.2.17", "test", "c")
		failsFast(t, s, key)
		for _, n := range c.Nodes {
			n.Restart()
		}
		c.WaitOK()
		recovers(t, s, key, 2*time.Second)
	})
}

// A call whose reply is lost is not sent again: Redis ran it once, the
// caller got ErrUnavailable, and the counter went up by one, not two.
func TestNoDoubleCounting(t *testing.T) {
	t.Parallel()
	bothModes(t, func(t *testing.T, batch bool) {
		srv := testredis.Start(t)
		px := startProxy(t, srv.Addr())
		s := open(t, "redis://"+px.addr()+"/0", Options{Timeout: testTimeout, Batch: batch})
		ctx := context.Background()
		for _, tc := range []struct {
			name string
			ttl  time.Duration // 0: INCRBY, else the script
		}{{"INCRBY", 0}, {"EVALSHA", time.Minute}} {
			key := store.Key("192.0.2.13", "test", tc.name)
			if _, err := s.Incr(ctx, key, 1, tc.ttl); err != nil {
				t.Fatal(err)
			}
			px.dropNextReply()
			if _, err := s.Incr(ctx, key, 1, tc.ttl); !errors.Is(err, store.ErrUnavailable) {
				t.Fatalf("%s: Incr with its reply lost: %v, want ErrUnavailable", tc.name, err)
			}
			if got := srv.MustDo("GET", key); got != "2" {
				t.Fatalf("%s: counter = %s after one counted and one lost Incr, want 2 (sent once)", tc.name, got)
			}
		}

		// The control: go-redis's default retries would have counted twice.
		c := goredis.NewClient(&goredis.Options{Addr: px.addr()})
		defer c.Close()
		key := store.Key("192.0.2.13", "test", "control")
		if err := c.IncrBy(ctx, key, 1).Err(); err != nil {
			t.Fatal(err)
		}
		px.dropNextReply()
		_ = c.IncrBy(ctx, key, 1).Err()
		if got := srv.MustDo("GET", key); got != "3" {
			t.Errorf("control: a default go-redis client left %s, expected 3 (a retry counting twice); the test proves less than it claims", got)
		}
	})
}

// The caller's own cancellation is not an outage.
func TestCallerCancelDoesNotTrip(t *testing.T) {
	t.Parallel()
	bothModes(t, func(t *testing.T, batch bool) {
		srv := testredis.Start(t)
		s := open(t, srv.URL(), Options{Timeout: testTimeout, Batch: batch})
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		for range 10 {
			if _, err := s.Incr(ctx, store.Key("192.0.2.14", "test", "c"), 1, 0); !errors.Is(err, context.Canceled) {
				t.Fatalf("Incr with a cancelled context: %v", err)
			}
		}
		if !s.Healthy() || s.Failures() != 0 {
			t.Fatalf("cancelled calls counted as failures: healthy %v, failures %d", s.Healthy(), s.Failures())
		}
	})
}

// While Redis is down the store answers at least as fast as when it is
// up: mail keeps flowing at its normal rate (issue: >= 0.9x).
func TestThroughputWhileDown(t *testing.T) {
	t.Parallel()
	bothModes(t, func(t *testing.T, batch bool) {
		srv := testredis.Start(t)
		s := open(t, srv.URL(), Options{Timeout: testTimeout, Batch: batch})
		key := store.Key("192.0.2.15", "test", "c")
		const n = 500
		rate := func() float64 {
			start := time.Now()
			for range n {
				_, _ = s.Incr(context.Background(), key, 1, time.Minute)
			}
			return n / time.Since(start).Seconds()
		}
		up := rate()
		srv.Kill()
		tripped(t, s, key)
		down := rate()
		t.Logf("Incr/s with Redis up %.0f, down %.0f: %.1fx", up, down, down/up)
		if down < 0.9*up {
			t.Fatalf("while Redis is down the store answers %.0f/s, below 0.9x its normal %.0f/s", down, up)
		}
	})
}

// On a Cluster, one master down fails only its own slots; the others
// keep counting and their breakers stay closed.
func TestClusterOneMasterDown(t *testing.T) {
	t.Parallel()
	bothModes(t, func(t *testing.T, batch bool) {
		c := testredis.StartCluster(t)
		s := open(t, c.URL(), Options{Timeout: testTimeout, Batch: batch})
		ctx := context.Background()
		// One key per master.
		keys := map[*testredis.Server]string{}
		for i := 0; len(keys) < len(c.Nodes); i++ {
			k := store.Key("192.0.2."+itoa(i), "test", "c")
			if n := c.NodeFor(k); keys[n] == "" {
				keys[n] = k
			}
		}
		for _, k := range keys {
			if _, err := s.Incr(ctx, k, 1, time.Minute); err != nil {
				t.Fatal(err)
			}
		}
		dead := c.Nodes[0]
		dead.Kill()
		tripped(t, s, keys[dead])
		failsFast(t, s, keys[dead])
		for n, k := range keys {
			if n == dead {
				continue
			}
			for range 20 {
				if _, err := s.Incr(ctx, k, 1, time.Minute); err != nil {
					t.Fatalf("Incr on a live master's slot: %v", err)
				}
			}
		}
		// A restarted master refuses (CLUSTERDOWN) until it has rejoined the
		// cluster, which is Redis's business; from then on, 2s.
		restarted := time.Now()
		dead.Restart()
		c.WaitOK()
		rejoined := time.Since(restarted)
		d := recovers(t, s, keys[dead], 2*time.Second)
		t.Logf("the restarted master rejoined after %v; its slots counted again %v later", rejoined, d)
	})
}

// A Sentinel failover during traffic: calls fail for a moment at most,
// then go to the new master.
func TestSentinelFailoverDuringTraffic(t *testing.T) {
	t.Parallel()
	bothModes(t, func(t *testing.T, batch bool) {
		set := testredis.StartSentinel(t)
		s := open(t, set.URL(), Options{Timeout: testTimeout, Batch: batch})
		key := store.Key("192.0.2.16", "test", "c")
		var ok, failed atomic.Int64
		stop := make(chan struct{})
		var wg sync.WaitGroup
		wg.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				_, err := s.Incr(context.Background(), key, 1, time.Minute)
				switch {
				case err == nil:
					ok.Add(1)
				case errors.Is(err, store.ErrUnavailable):
					failed.Add(1)
				default:
					t.Errorf("Incr during failover: %v", err)
				}
				time.Sleep(time.Millisecond)
			}
		})
		time.Sleep(100 * time.Millisecond)
		set.Failover()
		before := ok.Load()
		d := recovers(t, s, key, 3*time.Second)
		close(stop)
		wg.Wait()
		t.Logf("%d calls counted, %d failed; counting on the new master %v after the failover", ok.Load(), failed.Load(), d)
		if before == 0 {
			t.Fatal("nothing was counted before the failover")
		}
		if got := set.Master.Info("replication", "role"); got != "master" {
			t.Fatalf("new master's role %q", got)
		}
	})
}

func itoa(i int) string {
	return string(rune('0'+i/100%10)) + string(rune('0'+i/10%10)) + string(rune('0'+i%10))
}

// proxy forwards TCP to Redis and can lose one reply: the server has run
// the command, the client never hears back and sees its connection drop.
type proxy struct {
	ln     net.Listener
	target string
	drop   atomic.Bool
}

func startProxy(t *testing.T, target string) *proxy {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{ln: ln, target: target}
	var wg sync.WaitGroup
	t.Cleanup(func() {
		ln.Close()
		wg.Wait()
	})
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			wg.Go(func() { p.serve(c) })
		}
	})
	return p
}

func (p *proxy) addr() string { return p.ln.Addr().String() }

func (p *proxy) dropNextReply() { p.drop.Store(true) }

func (p *proxy) serve(c net.Conn) {
	defer c.Close()
	s, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	defer s.Close()
	go func() {
		_, _ = io.Copy(s, c)
		s.Close()
	}()
	buf := make([]byte, 64<<10)
	for {
		n, err := s.Read(buf)
		if err != nil {
			return
		}
		if p.drop.CompareAndSwap(true, false) {
			return // both connections close: the reply is lost
		}
		if _, err := c.Write(buf[:n]); err != nil {
			return
		}
	}
}

// bothModes runs f with commands sent one by one and batched.
func bothModes(t *testing.T, f func(t *testing.T, batch bool)) {
	for _, batch := range []bool{false, true} {
		name := "direct"
		if batch {
			name = "batched"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			f(t, batch)
		})
	}
}
