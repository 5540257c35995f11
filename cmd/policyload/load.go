package main

import (
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"time"

	gomilter "github.com/emersion/go-milter"
)

// config is one run, from the flags.
type config struct {
	proto       string
	addr        string
	concurrency int
	duration    time.Duration
	timeout     time.Duration
	states      stateSet
	body        []byte
	seed        uint64
	gen         *sessionGen
	flood       string // milter: a hostile flood instead of sessions (flood.go)
	// connPerRequest: policy, each request on a connection of its own,
	// half-closed after the request, as Exim's ${readsocket} asks.
	connPerRequest bool
}

// worker plays sessions until ctx ends or the pool is done (-fill).
type worker func(ctx context.Context, rng *rand.Rand, rec *recorder)

// runLoad runs cfg.concurrency workers for cfg.duration and merges what
// they recorded.
func runLoad(ctx context.Context, cfg *config) (*recorder, time.Duration) {
	ctx, cancel := context.WithTimeout(ctx, cfg.duration)
	defer cancel()
	w := policyWorker(cfg)
	switch {
	case cfg.flood != "":
		w = floodWorker(cfg)
	case cfg.proto == "milter":
		w = milterWorker(cfg)
	}
	recs := make([]*recorder, cfg.concurrency)
	var wg sync.WaitGroup
	start := time.Now()
	for i := range recs {
		recs[i] = newRecorder()
		rng := rand.New(rand.NewPCG(cfg.seed, uint64(i)))
		wg.Go(func() { w(ctx, rng, recs[i]) })
	}
	wg.Wait()
	elapsed := time.Since(start)
	total := newRecorder()
	for _, r := range recs {
		total.merge(r)
	}
	return total, elapsed
}

// retryPause paces reconnection after a failure, so a server that is down
// is not hammered in a tight loop; it ends early with the run.
func retryPause(ctx context.Context) {
	t := time.NewTimer(10 * time.Millisecond)
	defer t.Stop()
	select {
	case <-ctx.Done():
	case <-t.C:
	}
}

// policyWorker keeps one connection, like one smtpd process, and plays
// session after session over it; latency is per request.
func policyWorker(cfg *config) worker {
	return func(ctx context.Context, rng *rand.Rand, rec *recorder) {
		var pc *policyConn
		defer func() {
			if pc != nil {
				pc.close()
			}
		}()
		ask := func(req []byte) (string, error) {
			if ctx.Err() != nil {
				return "", errStop
			}
			t0 := time.Now()
			var a string
			var err error
			if cfg.connPerRequest {
				a, err = askOnce(cfg.addr, cfg.timeout, req)
			} else {
				a, err = pc.ask(req)
			}
			if err != nil {
				return "", err
			}
			rec.lat.add(time.Since(t0))
			rec.ops++
			rec.requests++
			rec.answers[classifyAction(a)]++
			return a, nil
		}
		for ctx.Err() == nil {
			if pc == nil && !cfg.connPerRequest {
				var err error
				if pc, err = dialPolicy(cfg.addr, cfg.timeout); err != nil {
					rec.fail(err)
					retryPause(ctx)
					continue
				}
			}
			s, err := cfg.gen.make(rng)
			if err != nil {
				return
			}
			switch err := playPolicy(s, cfg.states, ask); {
			case errors.Is(err, errStop):
				return
			case err != nil:
				if ctx.Err() != nil {
					return // cut by the end of the run, not a failure
				}
				rec.fail(err)
				if pc != nil {
					pc.close()
					pc = nil
				}
			default:
				rec.sessions++
			}
		}
	}
}

// milterWorker plays each session over a connection of its own, as
// Postfix does; latency is per whole session, from dial to QUIT.
func milterWorker(cfg *config) worker {
	cl := milterClient(cfg.addr, cfg.timeout)
	return func(ctx context.Context, rng *rand.Rand, rec *recorder) {
		answered := func(*gomilter.Action) { rec.requests++ }
		for ctx.Err() == nil {
			s, err := cfg.gen.make(rng)
			if err != nil {
				return
			}
			t0 := time.Now()
			ms, err := cl.Session()
			if err != nil {
				if ctx.Err() == nil {
					rec.fail(err)
					retryPause(ctx)
				}
				continue
			}
			rec.requests++ // the negotiation
			final, err := playMilter(s, ms, cfg.body, answered)
			if cerr := ms.Close(); err == nil && cerr != nil {
				err = cerr
			}
			if err != nil {
				if ctx.Err() == nil {
					rec.fail(err)
				}
				continue
			}
			rec.lat.add(time.Since(t0))
			rec.ops++
			rec.sessions++
			rec.answers[final]++
		}
	}
}
