package all_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/testing/testredis"
	"github.com/policyd-mail/policyd/rules"
	clientstats "github.com/policyd-mail/policyd/rules/client_stats"
	"github.com/policyd-mail/policyd/rules/rulestest"
	"github.com/policyd-mail/policyd/store"
	"github.com/policyd-mail/policyd/store/memory"
	redisstore "github.com/policyd-mail/policyd/store/redis"
)

// The bench chain's connect hook: a counter, then two reads.
const readAheadChain = `whitelist clients 192.0.2.200
connection_shaper threshold 100 exptime 60
client_stats
deny_repeat_offenders threshold 2
badmailfrom
`

var readAheadFiles = map[string]string{"badmailfrom": "spam@example.org\n"}

// gate holds every counter and read of the store until the test lets it
// through, and tells the test of each as it arrives.
type gate struct {
	store.Store
	arrived chan string
	release chan struct{}
}

func (g *gate) hold(op string) {
	g.arrived <- op
	<-g.release
}

func (g *gate) Incr(ctx context.Context, key string, delta int64, ttl time.Duration) (int64, error) {
	g.hold("Incr")
	return g.Store.Incr(ctx, key, delta, ttl)
}

func (g *gate) HGet(ctx context.Context, keys ...string) ([]map[string]int64, error) {
	g.hold(fmt.Sprintf("HGet(%d keys)", len(keys)))
	return g.Store.HGet(ctx, keys...)
}

// With read-ahead the connect hook's three store calls (the counter of
// connection_shaper, the reads of client_stats and deny_repeat_offenders)
// are all in flight before any answers: on Redis the session start
// waits for one round trip, not three. Without it, the chain would hold
// here with one call in flight, and the test fails.
func TestReadAheadSendsConnectReadsTogether(t *testing.T) {
	g := &gate{Store: memory.New(memory.Options{SweepInterval: -1}), arrived: make(chan string), release: make(chan struct{})}
	h := rulestest.NewWith(t, readAheadChain, readAheadFiles, rulestest.Options{Store: g, ReadAhead: true})
	done := make(chan rules.Decision)
	go func() {
		_, d := h.Connect("192.0.2.1")
		done <- d
	}()
	var inFlight []string
	for len(inFlight) < 3 {
		select {
		case op := <-g.arrived:
			inFlight = append(inFlight, op)
		case <-time.After(10 * time.Second):
			t.Fatalf("only %v in flight at once; want the counter and both reads", inFlight)
		}
	}
	for range inFlight {
		g.release <- struct{}{}
	}
	if d := <-done; d.Code != rules.Declined {
		t.Fatalf("connect: %v %s", d.Code, d.Text)
	}
}

// Read-ahead changes when the reads are sent, never what the chain
// decides: a client refused twice is deferred at its next connect by
// deny_repeat_offenders, client_stats notes its refusals, a whitelisted
// client is left alone, and a failed read fails the rule as before. Run
// on the embedded store and on a real Redis, with read-ahead and without.
func TestReadAheadDecidesAlike(t *testing.T) {
	srv := testredis.Start(t)
	type outcome struct {
		codes    []rules.Code
		permfail int64
	}
	scenario := func(t *testing.T, st store.Store, ahead bool, client string) outcome {
		h := rulestest.NewWith(t, readAheadChain, readAheadFiles, rulestest.Options{Store: st, ReadAhead: ahead})
		ctx := context.Background()
		var o outcome
		for i := range 4 {
			s := h.Session(client)
			d := s.Connect(ctx)
			o.codes = append(o.codes, d.Code)
			if i == 3 {
				stats, _ := s.Notes.Get(clientstats.NoteKey).(clientstats.Stats)
				o.permfail = stats.Permfail
			}
			if d.Code == rules.Declined {
				s.Mail(ctx, rules.MailFrom{Sender: "spam@example.org"})
				o.codes = append(o.codes, s.Rcpt(ctx, "a@example.test").Code)
			}
			s.End(ctx)
		}
		return o
	}
	stores := map[string]func(t *testing.T) store.Store{
		"memory": func(*testing.T) store.Store { return memory.New(memory.Options{SweepInterval: -1}) },
		"redis": func(t *testing.T) store.Store {
			srv.MustDo("FLUSHALL")
			st, err := redisstore.Open(srv.URL(), redisstore.Options{Timeout: time.Second, Batch: true})
			if err != nil {
				t.Fatal(err)
			}
			return st
		},
	}
	for i, client := range []string{"192.0.2.1", "192.0.2.200"} {
		for name, open := range stores {
			t.Run(name+"/"+client, func(t *testing.T) {
				var got [2]outcome
				for j, ahead := range []bool{false, true} {
					got[j] = scenario(t, open(t), ahead, client)
				}
				if fmt.Sprint(got[0]) != fmt.Sprint(got[1]) {
					t.Fatalf("without read-ahead %v, with it %v", got[0], got[1])
				}
				if i == 0 {
					want := fmt.Sprint(outcome{[]rules.Code{rules.Declined, rules.Deny, rules.Declined, rules.Deny, rules.DenySoft, rules.DenySoft}, 2})
					if fmt.Sprint(got[1]) != want {
						t.Fatalf("with read-ahead %v, want %v", got[1], want)
					}
				}
			})
		}
	}
	down := memory.New(memory.Options{SweepInterval: -1})
	down.Close()
	for _, ahead := range []bool{false, true} {
		h := rulestest.NewWith(t, readAheadChain, nil, rulestest.Options{Store: down, ReadAhead: ahead, OnStoreError: rules.FailTempfail})
		if _, d := h.Connect("192.0.2.9"); d.Code != rules.DenySoft || d.Rule != "connection_shaper" {
			t.Errorf("store down, read-ahead %v: %v from %s, want DENYSOFT from connection_shaper", ahead, d.Code, d.Rule)
		}
	}
}
