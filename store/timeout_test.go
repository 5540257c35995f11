package store_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/store"
)

// hung is a backend that never answers until its context ends.
type hung struct{}

func (hung) Incr(ctx context.Context, _ string, _ int64, _ time.Duration) (int64, error) {
	<-ctx.Done()
	return 0, ctx.Err()
}
func (hung) Get(ctx context.Context, _ string) ([]byte, bool, error) {
	<-ctx.Done()
	return nil, false, ctx.Err()
}
func (hung) Set(ctx context.Context, _ string, _ []byte, _ time.Duration) error {
	<-ctx.Done()
	return ctx.Err()
}
func (hung) Delete(ctx context.Context, _ string) error {
	<-ctx.Done()
	return ctx.Err()
}
func (hung) Close() error { return nil }

func TestWithTimeout(t *testing.T) {
	s := store.WithTimeout(hung{}, 20*time.Millisecond)
	ctx := context.Background()
	_, err1 := s.Incr(ctx, "k", 1, 0)
	_, _, err2 := s.Get(ctx, "k")
	err3 := s.Set(ctx, "k", nil, 0)
	err4 := s.Delete(ctx, "k")
	for i, err := range []error{err1, err2, err3, err4} {
		if !errors.Is(err, store.ErrUnavailable) {
			t.Errorf("call %d: %v, want ErrUnavailable", i, err)
		}
	}
	// A caller's own cancellation is not dressed up as an outage.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := s.Incr(cctx, "k", 1, 0); !errors.Is(err, context.Canceled) || errors.Is(err, store.ErrUnavailable) {
		t.Errorf("cancelled: %v", err)
	}
	if store.WithTimeout(hung{}, 0) != (hung{}) {
		t.Error("a zero timeout must leave the store as it is")
	}
}
