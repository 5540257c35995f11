package redis

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	goredis "github.com/redis/go-redis/v9"

	"github.com/policyd-mail/policyd/store"
)

// ms turns a ttl into whole milliseconds for PEXPIRE, rounding up so a
// short positive ttl never becomes 0 ("no expiry"); 0 for ttl <= 0.
func ms(ttl time.Duration) int64 {
	const most = 1e13 // ~317 years: longer is "no expiry" in practice, and Redis would refuse an overflowing one
	switch {
	case ttl <= 0:
		return 0
	case ttl/time.Millisecond >= most:
		return most
	}
	return int64((ttl + time.Millisecond - 1) / time.Millisecond)
}

// msDuration is ms as a Duration, for go-redis's own expiry arguments.
func msDuration(ttl time.Duration) time.Duration {
	return time.Duration(ms(ttl)) * time.Millisecond
}

// Incr implements store.Store. Without a ttl it is a plain INCRBY (which
// leaves any expiry alone); with one, incrScript.
func (s *Store) Incr(ctx context.Context, key string, delta int64, ttl time.Duration) (int64, error) {
	var n int64
	err := s.call(ctx, "incr", key, func(ctx context.Context) error {
		if ttl <= 0 {
			var err error
			n, err = s.mail.IncrBy(ctx, key, delta).Result()
			return err
		}
		v, err := incrScript.Run(ctx, s.mail, []string{key}, delta, ms(ttl)).Text()
		if err != nil {
			return err
		}
		n, err = strconv.ParseInt(v, 10, 64)
		return err
	})
	return n, err
}

// Get implements store.Store.
func (s *Store) Get(ctx context.Context, key string) ([]byte, bool, error) {
	var v []byte
	err := s.call(ctx, "get", key, func(ctx context.Context) error {
		var err error
		v, err = s.mail.Get(ctx, key).Bytes()
		return err
	})
	if errors.Is(err, goredis.Nil) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, err
	}
	return v, true, nil
}

// Set implements store.Store.
func (s *Store) Set(ctx context.Context, key string, value []byte, ttl time.Duration) error {
	return s.call(ctx, "set", key, func(ctx context.Context) error {
		// Not ttl itself: go-redis reads -1 as KEEPTTL.
		return s.mail.Set(ctx, key, value, msDuration(ttl)).Err()
	})
}

// SetNX implements store.Store with SET NX GET (Redis 7.0 or later): one
// command that stores or returns the current value.
func (s *Store) SetNX(ctx context.Context, key string, value []byte, ttl time.Duration) (bool, []byte, error) {
	var cur string
	err := s.call(ctx, "setnx", key, func(ctx context.Context) error {
		var err error
		cur, err = s.mail.SetArgs(ctx, key, value, goredis.SetArgs{Mode: "NX", Get: true, TTL: msDuration(ttl)}).Result()
		return err
	})
	if errors.Is(err, goredis.Nil) {
		return true, nil, nil
	}
	if err != nil {
		return false, nil, err
	}
	return false, []byte(cur), nil
}

// Delete implements store.Store: one DEL per hash tag, in one pipeline
// (a DEL of keys on several Cluster slots would be refused).
func (s *Store) Delete(ctx context.Context, keys ...string) error {
	if len(keys) == 0 {
		return nil
	}
	return s.call(ctx, "delete", keys[0], func(ctx context.Context) error {
		if store.SameTag(keys...) == nil {
			return s.mail.Del(ctx, keys...).Err()
		}
		groups := map[string][]string{}
		for _, k := range keys {
			tag := store.HashTag(k)
			groups[tag] = append(groups[tag], k)
		}
		_, err := s.mail.Pipelined(ctx, func(p goredis.Pipeliner) error {
			for _, g := range groups {
				p.Del(ctx, g...)
			}
			return nil
		})
		return err
	})
}

// HIncr implements store.Store with hincrScript.
func (s *Store) HIncr(ctx context.Context, ttl time.Duration, incs ...store.FieldIncr) error {
	if len(incs) == 0 {
		return nil
	}
	var keys []string
	index := make(map[string]int, len(incs))
	args := make([]any, 1, 1+3*len(incs))
	args[0] = ms(ttl)
	for _, in := range incs {
		i, ok := index[in.Key]
		if !ok {
			keys = append(keys, in.Key)
			i = len(keys) // Lua counts from 1
			index[in.Key] = i
		}
		args = append(args, i, in.Field, in.Delta)
	}
	if err := store.SameTag(keys...); err != nil {
		return fmt.Errorf("redis hincr: %w", err)
	}
	return s.call(ctx, "hincr", keys[0], func(ctx context.Context) error {
		return hincrScript.Run(ctx, s.mail, keys, args...).Err()
	})
}

// HGet implements store.Store: HGETALL for one key, hgetScript for more.
func (s *Store) HGet(ctx context.Context, keys ...string) ([]map[string]int64, error) {
	if len(keys) == 0 {
		return []map[string]int64{}, nil
	}
	if err := store.SameTag(keys...); err != nil {
		return nil, fmt.Errorf("redis hget: %w", err)
	}
	out := make([]map[string]int64, len(keys))
	err := s.call(ctx, "hget", keys[0], func(ctx context.Context) error {
		if len(keys) == 1 {
			m, err := s.mail.HGetAll(ctx, keys[0]).Result()
			if err != nil {
				return err
			}
			out[0], err = intFields(m)
			return err
		}
		v, err := hgetScript.Run(ctx, s.mail, keys).Slice()
		if err != nil {
			return err
		}
		if len(v) != len(keys) {
			return fmt.Errorf("hget script returned %d hashes for %d keys", len(v), len(keys))
		}
		for i, h := range v {
			flat, _ := h.([]any)
			if out[i], err = pairs(flat, strconv.ParseInt); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		return nil, err
	}
	return out, nil
}

// intFields converts an HGETALL map; nil for an empty (missing) hash.
func intFields(m map[string]string) (map[string]int64, error) {
	if len(m) == 0 {
		return nil, nil
	}
	out := make(map[string]int64, len(m))
	for f, v := range m {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("field %q: %w", f, err)
		}
		out[f] = n
	}
	return out, nil
}

// pairs converts a flat [field, value, ...] script reply; nil when empty.
func pairs(flat []any, parse func(s string, base, bits int) (int64, error)) (map[string]int64, error) {
	if len(flat) == 0 {
		return nil, nil
	}
	out := make(map[string]int64, len(flat)/2)
	for i := 0; i+1 < len(flat); i += 2 {
		f, _ := flat[i].(string)
		v, _ := flat[i+1].(string)
		n, err := parse(v, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("field %q: %w", f, err)
		}
		out[f] = n
	}
	return out, nil
}

// parseScore reads a sorted-set score, which Redis writes as a float.
func parseScore(s string, _, _ int) (int64, error) {
	f, err := strconv.ParseFloat(s, 64)
	return int64(f), err
}

// Tally implements store.Store with tallyScript.
func (s *Store) Tally(ctx context.Context, key string, now time.Time, quiet, ttl time.Duration) (int64, error) {
	var n int64
	err := s.call(ctx, "tally", key, func(ctx context.Context) error {
		var err error
		n, err = tallyScript.Run(ctx, s.mail, []string{key}, now.UnixMilli(), quiet.Milliseconds(), ms(ttl)).Int64()
		return err
	})
	return n, err
}

// Limit implements store.Store with limitScript: one round trip for
// every budget of the key.
func (s *Store) Limit(ctx context.Context, key string, now time.Time, rates ...store.Rate) (bool, []int64, error) {
	if err := store.CheckRates(rates); err != nil {
		return false, nil, err
	}
	var ok bool
	var used []int64
	err := s.call(ctx, "limit", key, func(ctx context.Context) error {
		args := make([]any, 0, 1+4*len(rates))
		args = append(args, now.UnixMicro())
		for _, r := range rates {
			// The interval as Go formats a float64 exactly ('g', -1), so
			// Lua's tonumber reads back the very double RateStep uses.
			interval := float64(r.Period.Microseconds()) / float64(r.Limit)
			args = append(args, r.Field, strconv.FormatFloat(interval, 'g', -1, 64), r.Cost, r.Limit)
		}
		v, err := limitScript.Run(ctx, s.mail, []string{key}, args...).Int64Slice()
		if err != nil {
			return err
		}
		if len(v) != 1+len(rates) {
			return fmt.Errorf("limit script returned %v", v)
		}
		ok, used = v[0] == 1, v[1:]
		return nil
	})
	return ok, used, err
}

// Acquire implements store.Store with acquireScript.
func (s *Store) Acquire(ctx context.Context, key, member string, limit int64, now time.Time, lease time.Duration) (bool, int64, error) {
	var granted bool
	var held int64
	err := s.call(ctx, "acquire", key, func(ctx context.Context) error {
		nowMS := now.UnixMilli()
		v, err := acquireScript.Run(ctx, s.mail, []string{key}, member, limit, nowMS, nowMS+lease.Milliseconds(), ms(lease)).Int64Slice()
		if err != nil {
			return err
		}
		if len(v) != 2 {
			return fmt.Errorf("acquire script returned %v", v)
		}
		granted, held = v[0] == 1, v[1]
		return nil
	})
	return granted, held, err
}

// Release implements store.Store.
func (s *Store) Release(ctx context.Context, key, member string) error {
	return s.call(ctx, "release", key, func(ctx context.Context) error {
		return s.mail.ZRem(ctx, key, member).Err()
	})
}

// scanTimeout bounds a whole Scan, which takes a SCAN round trip per
// thousand keys on every master. It is the admin API's, not the mail path's.
const scanTimeout = 5 * time.Second

// Scan implements store.Store: SCAN MATCH <prefix>* over every master. It
// does not count towards the breaker (a slow scan of a big Redis is not an
// outage) but is refused while the breaker is open.
func (s *Store) Scan(ctx context.Context, prefix string) ([]string, error) {
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("redis scan %s: %w", prefix, err)
	}
	if s.closed.Load() {
		return nil, fmt.Errorf("redis scan %s: %w", prefix, errClosed)
	}
	if s.main.open.Load() {
		return nil, fmt.Errorf("redis scan %s: %w", prefix, errOpen)
	}
	ctx, cancel := context.WithTimeout(ctx, scanTimeout)
	defer cancel()
	pattern := globEscape(prefix) + "*"
	seen := map[string]bool{}
	var err error
	switch c := s.c.(type) {
	case *goredis.ClusterClient:
		// Masters are scanned side by side; seen is shared.
		var mu sync.Mutex
		err = c.ForEachMaster(ctx, func(ctx context.Context, node *goredis.Client) error {
			return scanNode(ctx, node, pattern, func(k string) {
				mu.Lock()
				seen[k] = true
				mu.Unlock()
			})
		})
	case *goredis.Client:
		err = scanNode(ctx, c, pattern, func(k string) { seen[k] = true })
	}
	if err != nil {
		if unavailable(err) {
			err = fmt.Errorf("%w: %w", store.ErrUnavailable, err)
		}
		return nil, fmt.Errorf("redis scan %s: %w", prefix, err)
	}
	out := make([]string, 0, len(seen))
	for k := range seen {
		out = append(out, k)
	}
	sort.Strings(out)
	return out, nil
}

func scanNode(ctx context.Context, c *goredis.Client, pattern string, add func(string)) error {
	var cursor uint64
	for {
		keys, next, err := c.Scan(ctx, cursor, pattern, 1000).Result()
		if err != nil {
			return err
		}
		for _, k := range keys {
			add(k)
		}
		if next == 0 {
			return nil
		}
		cursor = next
	}
}

// globEscape quotes the characters SCAN MATCH treats as a pattern, so a
// prefix such as "policyd:{[2001:db8::1]}:" matches only itself. ('^' and
// '-' are special only inside brackets, which an escaped prefix never opens.)
func globEscape(s string) string {
	if !strings.ContainsAny(s, `*?[]\`) {
		return s
	}
	var b strings.Builder
	for _, r := range s {
		switch r {
		case '*', '?', '[', ']', '\\':
			b.WriteByte('\\')
		}
		b.WriteRune(r)
	}
	return b.String()
}

// Inspect implements store.Store with inspectScript.
func (s *Store) Inspect(ctx context.Context, key string) (store.Entry, bool, error) {
	var e store.Entry
	var found bool
	err := s.call(ctx, "inspect", key, func(ctx context.Context) error {
		v, err := inspectScript.Run(ctx, s.c, []string{key}).Slice()
		if err != nil {
			return err
		}
		if len(v) < 3 {
			return nil // type "none"
		}
		typ, _ := v[0].(string)
		pttl, _ := v[1].(int64)
		found = true
		e = store.Entry{Key: key}
		if pttl > 0 {
			e.TTL = time.Duration(pttl) * time.Millisecond
		}
		switch typ {
		case "string":
			str, _ := v[2].(string)
			e.Kind, e.Value = store.KindString, []byte(str)
		case "hash":
			flat, _ := v[2].([]any)
			e.Kind = store.KindHash
			e.Fields, err = pairs(flat, strconv.ParseInt)
		case "zset":
			flat, _ := v[2].([]any)
			e.Kind = store.KindLeases
			e.Fields, err = pairs(flat, parseScore)
		default:
			// Not written by policyd: show what it is, nothing more.
			e.Kind = store.Kind(typ)
		}
		return err
	})
	return e, found, err
}
