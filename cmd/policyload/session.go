package main

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"strings"
	"sync/atomic"
)

// session is one simulated SMTP session: one client, one TCP port,
// some messages with some recipients each. Both protocols play it.
type session struct {
	c     client
	idx   int    // the client's number in the pool, for names
	port  int    // the client's TCP port
	pid   uint32 // the smtpd process, for Postfix's instance
	sec   uint32 // when it started, for the instance and queue ids
	usec  uint32
	tls   bool
	msgs  []message
	body  int
	seqNo int // the session's number, for distinct senders
}

type message struct {
	sender string
	rcpts  []string
}

// queueID is what Postfix names message m: hex digits, upper case.
func (s *session) queueID(m int) string {
	return fmt.Sprintf("%05X%05X", s.sec&0xfffff, (s.usec+uint32(m))&0xfffff)
}

// instance is Postfix's message instance, "pid.sec.usec.seqno" in hex,
// seqno counting the messages of the session from 0.
func (s *session) instance(m int) string {
	return fmt.Sprintf("%x.%x.%x.%x", s.pid, s.sec, s.usec, m)
}

// sessionGen makes sessions. Its fields are read-only once the run
// starts, except next, which workers share.
type sessionGen struct {
	pool     clientPool
	messages int
	maxRcpts int
	body     int
	// fill gives every client one session, in order, then ends the run:
	// how a store is filled with N clients before a measurement.
	fill bool
	next atomic.Int64
}

// errPoolDone ends a worker once every client had its session (-fill).
var errPoolDone = errors.New("every client had its session")

func (g *sessionGen) make(rng *rand.Rand) (*session, error) {
	seq := g.next.Add(1) - 1
	idx := rng.IntN(g.pool.n)
	if g.fill {
		if seq >= int64(g.pool.n) {
			return nil, errPoolDone
		}
		idx = int(seq)
	}
	s := &session{
		c:     g.pool.get(idx),
		idx:   idx,
		port:  1024 + int(seq%64000),
		pid:   1000 + uint32(rng.IntN(30000)),
		sec:   0x65000000 + uint32(seq/1000),
		usec:  uint32(rng.IntN(1000000)),
		tls:   idx%2 == 0,
		body:  g.body,
		seqNo: int(seq),
		msgs:  make([]message, g.messages),
	}
	for m := range s.msgs {
		n := 1 + rng.IntN(g.maxRcpts)
		s.msgs[m].sender = fmt.Sprintf("user%d@client%d.example.net", seq%1000, idx)
		for r := range n {
			s.msgs[m].rcpts = append(s.msgs[m].rcpts, fmt.Sprintf("rcpt%d@example.test", (int(seq)+r)%5000))
		}
	}
	return s, nil
}

// Postfix's protocol states, in the order of an SMTP session.
var policyStates = []string{"CONNECT", "EHLO", "MAIL", "RCPT", "DATA", "END-OF-MESSAGE"}

// stateSet is where check_policy_service is listed: the states Postfix
// sends a request at.
type stateSet map[string]bool

func parseStates(s string) (stateSet, error) {
	set := stateSet{}
	for _, st := range strings.Split(s, ",") {
		st = strings.ToUpper(strings.TrimSpace(st))
		if st == "HELO" {
			st = "EHLO"
		}
		ok := false
		for _, known := range policyStates {
			ok = ok || st == known
		}
		if !ok {
			return nil, fmt.Errorf("states: %q is not one of %s", st, strings.Join(policyStates, ","))
		}
		set[st] = true
	}
	return set, nil
}
