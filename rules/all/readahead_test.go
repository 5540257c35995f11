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
// are all in flight before any answers, and they are all it makes: on
// Redis the session start waits for one round trip, not three. Without
// it, one call at a time is in flight and the test fails.
func TestReadAheadSendsConnectReadsTogether(t *testing.T) {
	g := &gate{Store: memory.New(memory.Options{SweepInterval: -1}), arrived: make(chan string), release: make(chan struct{})}
	h := rulestest.NewWith(t, readAheadChain, readAheadFiles, rulestest.Options{Store: g, ReadAhead: true})
	done := make(chan rules.Decision, 1)
	go func() {
		_, d := h.Connect("192.0.2.1")
		done <- d
	}()
	var calls []string
	held, together := 0, false
	timeout := time.After(10 * time.Second)
	for {
		select {
		case op := <-g.arrived:
			calls = append(calls, op)
			held++
			if held == 3 {
				together = true
			}
			if together || len(calls) > 3 {
				for ; held > 0; held-- {
					g.release <- struct{}{}
				}
			}
			continue
		case <-timeout:
			// Let the hook finish, one call at a time, then fail.
			for ; held > 0; held-- {
				g.release <- struct{}{}
			}
			go func() {
				for range g.arrived {
					g.release <- struct{}{}
				}
			}()
			<-done
			t.Fatalf("only %v in flight at once; want the counter and both reads", calls)
		case d := <-done:
			if d.Code != rules.Declined {
				t.Fatalf("connect: %v %s", d.Code, d.Text)
			}
		}
		break
	}
	if !together || len(calls) != 3 {
		t.Fatalf("store calls %v (three at once: %v); want the counter and both reads, once each, together", calls, together)
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
	// A global trial: hosts_allow's would-be refusal does not end the
	// connect hook, and client_stats' and deny_repeat_offenders'
	// observers write the records the rules after it read. The rules
	// must see those writes, as they do without read-ahead.
	const trialChain = "hosts_allow max_conn_ip 0\nclient_stats\ndeny_repeat_offenders threshold 1\n"
	trialFiles := map[string]string{"hosts_allow": "net 192.0.2.0/24 DENY go away\n"}
	for name, open := range stores {
		t.Run("dry-run/"+name, func(t *testing.T) {
			var got [2]int64
			for j, ahead := range []bool{false, true} {
				h := rulestest.NewWith(t, trialChain, trialFiles, rulestest.Options{Store: open(t), ReadAhead: ahead, DryRun: true})
				s, d := h.Connect("192.0.2.7")
				if d.Code != rules.Deny || !d.DryRun {
					t.Fatalf("read-ahead %v: %v (dry run %v), want a would-be DENY", ahead, d.Code, d.DryRun)
				}
				stats, _ := s.Notes.Get(clientstats.NoteKey).(clientstats.Stats)
				got[j] = stats.Permfail
			}
			if got != [2]int64{1, 1} {
				t.Fatalf("client_stats saw %d refusals without read-ahead, %d with it; want the one just counted", got[0], got[1])
			}
		})
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
