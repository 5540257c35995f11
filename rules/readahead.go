package rules

import "context"

// Reading ahead at the session start. The connect hook runs its rules in
// order, and a rule may end it, so on a store across the network each
// rule's store call waits for the one before it: connection_shaper's
// counter, then client_stats' records, then deny_repeat_offenders'
// record cost three round trips in a row. The reads among them need not
// wait: what they read does not depend on the rules before them.

// ConnectReader is a rule whose connect hook begins by reading hash
// records (one HGet, one hash tag) that no rule before it writes at
// connect. It names them, so that on a store with Options.ReadAhead the
// chain sends every such read as the hook starts, beside the first
// rule's own call, and the rule takes the answer with ReadAhead: a
// session start waits for one round trip, not one per rule.
//
// The reads are sent before any rule has run: for a client the
// whitelist will vouch for, or one an earlier rule refuses, they are
// read and not used. A global trial (--dry-run) does not read ahead:
// its observers run in the middle of the hook and write these records.
type ConnectReader interface {
	// ConnectReads lists the keys the connect hook will read for s, or
	// nil when it will read none.
	ConnectReads(s *Session) []string
}

// readAhead is one read sent early. Its goroutine writes recs and err
// and then closes done; the session's goroutine reads them only after
// done, so the two never touch them at once. A read nobody takes (the
// hook ended before its rule) finishes on its own and is dropped.
type readAhead struct {
	by    ConnectReader
	taken bool
	done  chan struct{}
	recs  []map[string]int64
	err   error
}

// startReads sends the reads the connect hook's rules declared, each on
// its own goroutine so that a pipelining store carries them with the
// first rule's call in one batch.
func (c *Chain) startReads(ctx context.Context, s *Session) {
	for _, r := range c.readers {
		keys := r.ConnectReads(s)
		if len(keys) == 0 {
			continue
		}
		ra := &readAhead{by: r, done: make(chan struct{})}
		s.ahead = append(s.ahead, ra)
		go func() {
			ra.recs, ra.err = c.opts.Store.HGet(ctx, keys...)
			close(ra.done)
		}()
	}
}

// ReadAhead gives rule r, in its connect hook, the answer of the read
// the chain sent ahead for it, once. ok is false when there is none (the
// store does not read ahead, or r declared nothing for s): the rule
// then reads for itself.
func (s *Session) ReadAhead(ctx context.Context, r ConnectReader) (recs []map[string]int64, ok bool, err error) {
	for _, ra := range s.ahead {
		if ra.taken || ra.by != r {
			continue
		}
		ra.taken = true
		select {
		case <-ra.done:
			return ra.recs, true, ra.err
		case <-ctx.Done():
			return nil, true, ctx.Err()
		}
	}
	return nil, false, nil
}
