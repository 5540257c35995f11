package memory

import (
	"bytes"
	"context"
	"fmt"
	"slices"
	"sort"
	"time"

	"github.com/policyd-mail/policyd/store"
)

// locked runs f on the shard of keys (which must share a hash tag, so they
// share a shard) under its lock, after the checks every operation makes.
func (s *Store) locked(ctx context.Context, op string, keys []string, f func(sh *shard, now int64) error) error {
	if len(keys) == 0 {
		return nil
	}
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("memory %s %s: %w", op, keys[0], err)
	}
	if err := store.SameTag(keys...); err != nil {
		return fmt.Errorf("memory %s: %w", op, err)
	}
	now := s.nowNanos()
	sh := s.shard(keys[0])
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if s.closed.Load() {
		return fmt.Errorf("memory %s %s: %w", op, keys[0], errClosed)
	}
	if err := f(sh, now); err != nil {
		return fmt.Errorf("memory %s %s: %w", op, keys[0], err)
	}
	return nil
}

// set stores e under key and journals it. The shard is locked.
func (sh *shard) set(key string, e entry) error {
	if err := sh.t.put(key, e); err != nil {
		return err
	}
	if sh.j != nil {
		sh.j.put(key, e)
	}
	return nil
}

// remove deletes key and journals it. The shard is locked.
func (sh *shard) remove(key string) {
	if sh.t.del(key) && sh.j != nil {
		sh.j.del(key)
	}
}

// live returns key's entry if it exists and has not expired; an expired
// one is reclaimed on the way. Expiry needs no journal record: replay
// drops what has expired.
func (sh *shard) live(key string, now int64) (entry, bool) {
	e, ok := sh.t.get(key)
	if ok && e.expired(now) {
		sh.t.del(key)
		return entry{}, false
	}
	return e, ok
}

// SetNX implements store.Store.
func (s *Store) SetNX(ctx context.Context, key string, value []byte, ttl time.Duration) (bool, []byte, error) {
	v := string(value)
	var stored bool
	var cur entry
	err := s.locked(ctx, "setnx", []string{key}, func(sh *shard, now int64) error {
		e, ok := sh.live(key, now)
		if !ok {
			stored = true
			return sh.set(key, entry{val: v, expires: deadline(now, ttl)})
		}
		if !e.kind.isString() {
			return store.ErrWrongType
		}
		cur = e
		return nil
	})
	if err != nil || stored {
		return stored, nil, err
	}
	return false, cur.text(), nil
}

// text is a string entry's value as the caller's own bytes.
func (e entry) text() []byte {
	if e.kind == kindInt {
		return fmt.Appendf(nil, "%d", e.n)
	}
	return []byte(e.val)
}

// HIncr implements store.Store.
func (s *Store) HIncr(ctx context.Context, ttl time.Duration, incs ...store.FieldIncr) error {
	keys := make([]string, len(incs))
	for i, in := range incs {
		keys[i] = in.Key
	}
	return s.locked(ctx, "hincr", keys, func(sh *shard, now int64) error {
		// Every new record is computed, and room made for all of them,
		// before any is written: a type error or a failure to map memory
		// changes nothing.
		exp := deadline(now, ttl)
		news := make([]entry, len(incs))
		for i, in := range incs {
			e, ok := entry{}, false
			// A key met before in this call has its new record already.
			for j := i - 1; j >= 0 && !ok; j-- {
				if incs[j].Key == in.Key {
					e, ok = news[j], true
				}
			}
			if !ok {
				if e, ok = sh.live(in.Key, now); !ok {
					e = entry{kind: kindHash}
				} else if e.kind != kindHash {
					return store.ErrWrongType
				}
			}
			old, _ := fieldGet(e.val, in.Field)
			e.val = fieldSet(e.val, in.Field, old+in.Delta)
			e.expires = exp
			news[i] = e
		}
		if err := sh.reserveFor(incs, news); err != nil {
			return err
		}
		sh.t.holdCompaction = true
		defer func() {
			sh.t.holdCompaction = false
			sh.t.maybeCompact()
		}()
		for i, in := range incs {
			if !lastOf(incs, i) {
				continue // the later record has this one's fields too
			}
			if err := sh.set(in.Key, news[i]); err != nil {
				return err // unreachable after reserve
			}
		}
		return nil
	})
}

// reserveFor makes room for HIncr's new records. Nearly always the
// table has room for the most they could take; otherwise what they need
// exactly is worked out, so that records updated in place need nothing.
func (sh *shard) reserveFor(incs []store.FieldIncr, news []entry) error {
	most := 0
	for i, in := range incs {
		most += maxRecordSize(in.Key, news[i])
	}
	if sh.t.hasRoom(len(incs), most) {
		return nil
	}
	inserts, room := 0, 0
	for i, in := range incs {
		if !lastOf(incs, i) {
			continue
		}
		insert, bytes := sh.t.need(in.Key, news[i])
		if insert {
			inserts++
		}
		room += bytes
	}
	return sh.t.reserve(inserts, room)
}

// lastOf reports whether incs[i] is the last increment of its key.
func lastOf(incs []store.FieldIncr, i int) bool {
	for _, later := range incs[i+1:] {
		if later.Key == incs[i].Key {
			return false
		}
	}
	return true
}

// HGet implements store.Store.
func (s *Store) HGet(ctx context.Context, keys ...string) ([]map[string]int64, error) {
	out := make([]map[string]int64, len(keys))
	err := s.locked(ctx, "hget", keys, func(sh *shard, now int64) error {
		for i, k := range keys {
			e, ok := sh.live(k, now)
			if !ok {
				continue
			}
			if e.kind != kindHash {
				return store.ErrWrongType
			}
			out[i] = fieldsMap(e.val)
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// Tally implements store.Store.
func (s *Store) Tally(ctx context.Context, key string, now time.Time, quiet, ttl time.Duration) (int64, error) {
	var count int64
	err := s.locked(ctx, "tally", []string{key}, func(sh *shard, clock int64) error {
		e, ok := sh.live(key, clock)
		switch {
		case !ok:
			e = entry{kind: kindHash}
		case e.kind != kindHash:
			return store.ErrWrongType
		}
		nowMS := now.UnixMilli()
		count, _ = fieldGet(e.val, store.TallyCount)
		if last, seen := fieldGet(e.val, store.TallyLast); !seen || nowMS-last > quiet.Milliseconds() {
			count = 0
		}
		count++
		e.val = fieldSet(fieldSet(e.val, store.TallyCount, count), store.TallyLast, nowMS)
		e.expires = deadline(clock, ttl)
		return sh.set(key, e)
	})
	return count, err
}

// Limit implements store.Store.
func (s *Store) Limit(ctx context.Context, key string, now time.Time, rates ...store.Rate) (bool, []int64, error) {
	if err := store.CheckRates(rates); err != nil {
		return false, nil, err
	}
	used := make([]int64, len(rates))
	ok := true
	err := s.locked(ctx, "limit", []string{key}, func(sh *shard, clock int64) error {
		e, found := sh.live(key, clock)
		switch {
		case !found:
			e = entry{kind: kindHash}
		case e.kind != kindHash:
			return store.ErrWrongType
		}
		nowUS := now.UnixMicro()
		var stack [4]int64
		next := stack[:0]
		for i, r := range rates {
			tat, had := fieldGet(e.val, r.Field)
			n, u, conforms := store.RateStep(r, tat, had, nowUS)
			used[i] = u
			next = append(next, n)
			if r.Cost > 0 && !conforms {
				ok = false
			}
		}
		if !ok {
			return nil
		}
		for i, r := range rates {
			if r.Cost > 0 {
				e.val = fieldSet(e.val, r.Field, next[i])
			}
		}
		// The record lives until its fullest budget is whole again.
		var last int64
		for _, tat := range fieldsAll(e.val) {
			last = max(last, tat)
		}
		if last <= nowUS {
			sh.remove(key)
			return nil
		}
		e.expires = deadline(clock, time.Duration(last-nowUS)*time.Microsecond)
		return sh.set(key, e)
	})
	if err != nil {
		return false, nil, err
	}
	return ok, used, nil
}

// Acquire implements store.Store.
func (s *Store) Acquire(ctx context.Context, key, member string, limit int64, now time.Time, lease time.Duration) (bool, int64, error) {
	var granted bool
	var held int64
	err := s.locked(ctx, "acquire", []string{key}, func(sh *shard, clock int64) error {
		e, ok := sh.live(key, clock)
		switch {
		case !ok:
			e = entry{kind: kindLeases}
		case e.kind != kindLeases:
			return store.ErrWrongType
		}
		nowMS := now.UnixMilli()
		// Run-out leases go; the member's own is not another's.
		var others int64
		e.val = fieldsEdit(e.val, func(f string, until int64) (int64, bool) {
			live := until > nowMS
			if live && f != member {
				others++
			}
			return until, live
		}, "", 0, false)
		if others < limit {
			e.val = fieldSet(e.val, member, nowMS+lease.Milliseconds())
			granted = true
		}
		held = int64(fieldCount(e.val))
		if held == 0 {
			sh.remove(key)
			return nil
		}
		e.expires = deadline(clock, lease)
		return sh.set(key, e)
	})
	return granted, held, err
}

// Release implements store.Store.
func (s *Store) Release(ctx context.Context, key, member string) error {
	return s.locked(ctx, "release", []string{key}, func(sh *shard, clock int64) error {
		e, ok := sh.live(key, clock)
		switch {
		case !ok:
			return nil
		case e.kind != kindLeases:
			return store.ErrWrongType
		}
		e.val = fieldDel(e.val, member)
		if e.val == "" {
			sh.remove(key)
			return nil
		}
		return sh.set(key, e)
	})
}

// Scan implements store.Store. It walks every shard, so it is for the
// admin API, not for the mail path.
func (s *Store) Scan(ctx context.Context, prefix string) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("memory scan: %w", err)
	}
	now := s.nowNanos()
	var out []string
	// One buffer for every key: a scan of millions of records allocates
	// only for the keys it returns.
	buf := make([]byte, 0, 128)
	for i := range s.shards {
		var err error
		if out, buf, err = s.scanShard(ctx, i, prefix, now, out, buf); err != nil {
			return nil, err
		}
	}
	// A record rewritten during the scan may be met twice.
	sort.Strings(out)
	return slices.Compact(out), nil
}

// scanSlice is how many records a scan walks per hold of a shard's lock:
// the mail path waits at most that long for a shard an admin scans.
const scanSlice = 512

// scanPause, when set (by tests), runs between two holds of a shard's lock.
var scanPause func(shard int)

func (s *Store) scanShard(ctx context.Context, i int, prefix string, now int64, out []string, buf []byte) ([]string, []byte, error) {
	sh := &s.shards[i]
	sh.mu.Lock()
	sh.t.scanning++
	sh.mu.Unlock()
	defer func() {
		sh.mu.Lock()
		sh.t.scanning--
		sh.t.maybeCompact()
		sh.mu.Unlock()
	}()
	for off := 0; ; {
		if err := ctx.Err(); err != nil {
			return out, buf, fmt.Errorf("memory scan: %w", err)
		}
		sh.mu.Lock()
		if s.closed.Load() {
			sh.mu.Unlock()
			return out, buf, fmt.Errorf("memory scan: %w", errClosed)
		}
		off, buf = sh.t.walkFrom(off, scanSlice, buf, func(key []byte, expires int64) {
			if (expires == 0 || now < expires) && bytes.HasPrefix(key, []byte(prefix)) {
				out = append(out, string(key))
			}
		})
		done := off >= sh.t.top
		sh.mu.Unlock()
		if done {
			return out, buf, nil
		}
		if scanPause != nil {
			scanPause(i)
		}
	}
}

// Inspect implements store.Store.
func (s *Store) Inspect(ctx context.Context, key string) (store.Entry, bool, error) {
	var out store.Entry
	var found bool
	err := s.locked(ctx, "inspect", []string{key}, func(sh *shard, now int64) error {
		e, ok := sh.live(key, now)
		if !ok {
			return nil
		}
		found = true
		out = store.Entry{Key: key}
		if e.expires != 0 {
			out.TTL = time.Duration(e.expires - now)
		}
		switch e.kind {
		case kindHash:
			out.Kind, out.Fields = store.KindHash, fieldsMap(e.val)
		case kindLeases:
			out.Kind, out.Fields = store.KindLeases, fieldsMap(e.val)
		default:
			out.Kind, out.Value = store.KindString, e.text()
		}
		return nil
	})
	return out, found, err
}
