package metrics

import (
	"context"
	"errors"
	"reflect"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/policyd-mail/policyd/store"
)

// The results of policyd_store_operations_total.
const (
	resultOK          = "ok"
	resultUnavailable = "unavailable" // store.ErrUnavailable or a deadline: what --on-store-error acts on
	resultCanceled    = "canceled"    // the caller gave up (session ended): not the store's fault
	resultError       = "error"       // anything else: wrong type, cross slot, a backend bug
)

var storeResults = []string{resultOK, resultUnavailable, resultCanceled, resultError}

// InstrumentStore counts and times every operation of s into r:
// policyd_store_operations_total{op,result} and
// policyd_store_duration_seconds{op}, op being the method name in lower
// case ("incr", "setnx"). Close is passed through uncounted.
//
// Wrap the store the rules get, outside any timeout wrapper, so that a
// timeout is counted as the unavailable result it turns into.
func InstrumentStore(s store.Store, r *Registry) store.Store {
	is := &instrumentedStore{Store: s, ops: map[string]*opMetrics{}}
	// Every operation of the interface gets its series at zero from the
	// start (so rate() and alerts see the first error), named after the
	// method: a method added to store.Store only needs its two-line
	// wrapper below.
	t := reflect.TypeFor[store.Store]()
	for i := range t.NumMethod() {
		op := strings.ToLower(t.Method(i).Name)
		if op == "close" {
			continue
		}
		m := &opMetrics{dur: r.storeDur.WithLabelValues(op)}
		for j, res := range storeResults {
			m.results[j] = r.storeOps.WithLabelValues(op, res)
		}
		is.ops[op] = m
	}
	return is
}

type opMetrics struct {
	results [4]prometheus.Counter // in storeResults order
	dur     prometheus.Observer
}

// instrumentedStore embeds the store it wraps so that it keeps compiling
// when store.Store grows; TestEveryStoreOperationIsCounted then fails until
// the new method has its wrapper here.
type instrumentedStore struct {
	store.Store
	ops map[string]*opMetrics
}

// done records one operation; call it deferred, with the named error
// result: defer s.done("incr", time.Now(), &err).
func (s *instrumentedStore) done(op string, start time.Time, err *error) {
	m := s.ops[op]
	if m == nil {
		return // not an operation of the interface: nothing to count
	}
	m.dur.Observe(time.Since(start).Seconds())
	m.results[classify(*err)].Inc()
}

// classify maps an error to its index in storeResults.
func classify(err error) int {
	switch {
	case err == nil:
		return 0
	case errors.Is(err, store.ErrUnavailable), errors.Is(err, context.DeadlineExceeded):
		return 1
	case errors.Is(err, context.Canceled):
		return 2
	}
	return 3
}

func (s *instrumentedStore) Incr(ctx context.Context, key string, delta int64, ttl time.Duration) (n int64, err error) {
	defer s.done("incr", time.Now(), &err)
	return s.Store.Incr(ctx, key, delta, ttl)
}

func (s *instrumentedStore) Get(ctx context.Context, key string) (v []byte, ok bool, err error) {
	defer s.done("get", time.Now(), &err)
	return s.Store.Get(ctx, key)
}

func (s *instrumentedStore) Set(ctx context.Context, key string, value []byte, ttl time.Duration) (err error) {
	defer s.done("set", time.Now(), &err)
	return s.Store.Set(ctx, key, value, ttl)
}

func (s *instrumentedStore) SetNX(ctx context.Context, key string, value []byte, ttl time.Duration) (stored bool, current []byte, err error) {
	defer s.done("setnx", time.Now(), &err)
	return s.Store.SetNX(ctx, key, value, ttl)
}

func (s *instrumentedStore) Delete(ctx context.Context, keys ...string) (err error) {
	defer s.done("delete", time.Now(), &err)
	return s.Store.Delete(ctx, keys...)
}

func (s *instrumentedStore) HIncr(ctx context.Context, ttl time.Duration, incs ...store.FieldIncr) (err error) {
	defer s.done("hincr", time.Now(), &err)
	return s.Store.HIncr(ctx, ttl, incs...)
}

func (s *instrumentedStore) HGet(ctx context.Context, keys ...string) (v []map[string]int64, err error) {
	defer s.done("hget", time.Now(), &err)
	return s.Store.HGet(ctx, keys...)
}

func (s *instrumentedStore) Tally(ctx context.Context, key string, now time.Time, quiet, ttl time.Duration) (n int64, err error) {
	defer s.done("tally", time.Now(), &err)
	return s.Store.Tally(ctx, key, now, quiet, ttl)
}

func (s *instrumentedStore) Limit(ctx context.Context, key string, now time.Time, rates ...store.Rate) (ok bool, used []int64, err error) {
	defer s.done("limit", time.Now(), &err)
	return s.Store.Limit(ctx, key, now, rates...)
}

func (s *instrumentedStore) Acquire(ctx context.Context, key, member string, limit int64, now time.Time, lease time.Duration) (granted bool, held int64, err error) {
	defer s.done("acquire", time.Now(), &err)
	return s.Store.Acquire(ctx, key, member, limit, now, lease)
}

func (s *instrumentedStore) Release(ctx context.Context, key, member string) (err error) {
	defer s.done("release", time.Now(), &err)
	return s.Store.Release(ctx, key, member)
}

func (s *instrumentedStore) Scan(ctx context.Context, prefix string) (keys []string, err error) {
	defer s.done("scan", time.Now(), &err)
	return s.Store.Scan(ctx, prefix)
}

func (s *instrumentedStore) Inspect(ctx context.Context, key string) (e store.Entry, ok bool, err error) {
	defer s.done("inspect", time.Now(), &err)
	return s.Store.Inspect(ctx, key)
}
