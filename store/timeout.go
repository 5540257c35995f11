package store

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// WithTimeout bounds every call to a remote backend by d (--store-timeout),
// so a hung server costs a session at most d per rule, never the MTA's
// own timeout. The embedded store needs no bound: it cannot hang.
func WithTimeout(s Store, d time.Duration) Store {
	if d <= 0 {
		return s
	}
	return &timeoutStore{s: s, d: d}
}

type timeoutStore struct {
	s Store
	d time.Duration
}

// call runs one operation under the bound and names a timeout as the
// store being unavailable, which is what the engine's policy acts on.
func call[T any](t *timeoutStore, ctx context.Context, op string, f func(context.Context) (T, error)) (T, error) {
	ctx, cancel := context.WithTimeout(ctx, t.d)
	defer cancel()
	v, err := f(ctx)
	if errors.Is(err, context.DeadlineExceeded) {
		err = fmt.Errorf("store %s: no answer within %v: %w", op, t.d, ErrUnavailable)
	}
	return v, err
}

func (t *timeoutStore) Incr(ctx context.Context, key string, delta int64, ttl time.Duration) (int64, error) {
	return call(t, ctx, "incr", func(ctx context.Context) (int64, error) { return t.s.Incr(ctx, key, delta, ttl) })
}

func (t *timeoutStore) Get(ctx context.Context, key string) ([]byte, bool, error) {
	type r struct {
		v  []byte
		ok bool
	}
	x, err := call(t, ctx, "get", func(ctx context.Context) (r, error) {
		v, ok, err := t.s.Get(ctx, key)
		return r{v, ok}, err
	})
	return x.v, x.ok, err
}

func (t *timeoutStore) Set(ctx context.Context, key string, value []byte, ttl time.Duration) error {
	_, err := call(t, ctx, "set", func(ctx context.Context) (struct{}, error) {
		return struct{}{}, t.s.Set(ctx, key, value, ttl)
	})
	return err
}

func (t *timeoutStore) SetNX(ctx context.Context, key string, value []byte, ttl time.Duration) (bool, []byte, error) {
	type r struct {
		stored bool
		cur    []byte
	}
	x, err := call(t, ctx, "setnx", func(ctx context.Context) (r, error) {
		stored, cur, err := t.s.SetNX(ctx, key, value, ttl)
		return r{stored, cur}, err
	})
	return x.stored, x.cur, err
}

func (t *timeoutStore) Delete(ctx context.Context, keys ...string) error {
	_, err := call(t, ctx, "delete", func(ctx context.Context) (struct{}, error) {
		return struct{}{}, t.s.Delete(ctx, keys...)
	})
	return err
}

func (t *timeoutStore) HIncr(ctx context.Context, ttl time.Duration, incs ...FieldIncr) error {
	_, err := call(t, ctx, "hincr", func(ctx context.Context) (struct{}, error) {
		return struct{}{}, t.s.HIncr(ctx, ttl, incs...)
	})
	return err
}

func (t *timeoutStore) HGet(ctx context.Context, keys ...string) ([]map[string]int64, error) {
	return call(t, ctx, "hget", func(ctx context.Context) ([]map[string]int64, error) { return t.s.HGet(ctx, keys...) })
}

func (t *timeoutStore) Tally(ctx context.Context, key string, now time.Time, quiet, ttl time.Duration) (int64, error) {
	return call(t, ctx, "tally", func(ctx context.Context) (int64, error) { return t.s.Tally(ctx, key, now, quiet, ttl) })
}

func (t *timeoutStore) Acquire(ctx context.Context, key, member string, limit int64, now time.Time, lease time.Duration) (bool, int64, error) {
	type r struct {
		granted bool
		held    int64
	}
	x, err := call(t, ctx, "acquire", func(ctx context.Context) (r, error) {
		g, h, err := t.s.Acquire(ctx, key, member, limit, now, lease)
		return r{g, h}, err
	})
	return x.granted, x.held, err
}

func (t *timeoutStore) Release(ctx context.Context, key, member string) error {
	_, err := call(t, ctx, "release", func(ctx context.Context) (struct{}, error) {
		return struct{}{}, t.s.Release(ctx, key, member)
	})
	return err
}

func (t *timeoutStore) Scan(ctx context.Context, prefix string) ([]string, error) {
	return call(t, ctx, "scan", func(ctx context.Context) ([]string, error) { return t.s.Scan(ctx, prefix) })
}

func (t *timeoutStore) Inspect(ctx context.Context, key string) (Entry, bool, error) {
	type r struct {
		e  Entry
		ok bool
	}
	x, err := call(t, ctx, "inspect", func(ctx context.Context) (r, error) {
		e, ok, err := t.s.Inspect(ctx, key)
		return r{e, ok}, err
	})
	return x.e, x.ok, err
}

func (t *timeoutStore) Close() error { return t.s.Close() }
