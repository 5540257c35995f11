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

func (t *timeoutStore) wrap(err error, op string) error {
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("store %s: no answer within %v: %w", op, t.d, ErrUnavailable)
	}
	return err
}

func (t *timeoutStore) Incr(ctx context.Context, key string, delta int64, ttl time.Duration) (int64, error) {
	ctx, cancel := context.WithTimeout(ctx, t.d)
	defer cancel()
	n, err := t.s.Incr(ctx, key, delta, ttl)
	return n, t.wrap(err, "incr")
}

func (t *timeoutStore) Get(ctx context.Context, key string) ([]byte, bool, error) {
	ctx, cancel := context.WithTimeout(ctx, t.d)
	defer cancel()
	v, ok, err := t.s.Get(ctx, key)
	return v, ok, t.wrap(err, "get")
}

func (t *timeoutStore) Set(ctx context.Context, key string, value []byte, ttl time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, t.d)
	defer cancel()
	return t.wrap(t.s.Set(ctx, key, value, ttl), "set")
}

func (t *timeoutStore) Delete(ctx context.Context, key string) error {
	ctx, cancel := context.WithTimeout(ctx, t.d)
	defer cancel()
	return t.wrap(t.s.Delete(ctx, key), "delete")
}

func (t *timeoutStore) Close() error { return t.s.Close() }
