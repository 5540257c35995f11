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
func (hung) Delete(ctx context.Context, _ ...string) error {
	<-ctx.Done()
	return ctx.Err()
}
func (hung) SetNX(ctx context.Context, _ string, _ []byte, _ time.Duration) (bool, []byte, error) {
	<-ctx.Done()
	return false, nil, ctx.Err()
}
func (hung) HIncr(ctx context.Context, _ time.Duration, _ ...store.FieldIncr) error {
	<-ctx.Done()
	return ctx.Err()
}
func (hung) HGet(ctx context.Context, _ ...string) ([]map[string]int64, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}
func (hung) Tally(ctx context.Context, _ string, _ time.Time, _, _ time.Duration) (int64, error) {
	<-ctx.Done()
	return 0, ctx.Err()
}
func (hung) Acquire(ctx context.Context, _, _ string, _ int64, _ time.Time, _ time.Duration) (bool, int64, error) {
	<-ctx.Done()
	return false, 0, ctx.Err()
}
func (hung) Release(ctx context.Context, _, _ string) error {
	<-ctx.Done()
	return ctx.Err()
}
func (hung) Scan(ctx context.Context, _ string) ([]string, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}
func (hung) Inspect(ctx context.Context, _ string) (store.Entry, bool, error) {
	<-ctx.Done()
	return store.Entry{}, false, ctx.Err()
}
func (hung) Close() error { return nil }

func TestWithTimeout(t *testing.T) {
	s := store.WithTimeout(hung{}, 20*time.Millisecond)
	ctx := context.Background()
	_, err1 := s.Incr(ctx, "k", 1, 0)
	_, _, err2 := s.Get(ctx, "k")
	err3 := s.Set(ctx, "k", nil, 0)
	err4 := s.Delete(ctx, "k")
	_, _, err5 := s.SetNX(ctx, "k", nil, 0)
	err6 := s.HIncr(ctx, 0, store.FieldIncr{Key: "k", Field: "f", Delta: 1})
	_, err7 := s.HGet(ctx, "k")
	_, err8 := s.Tally(ctx, "k", time.Now(), time.Hour, time.Hour)
	_, _, err9 := s.Acquire(ctx, "k", "m", 1, time.Now(), time.Minute)
	err10 := s.Release(ctx, "k", "m")
	_, err11 := s.Scan(ctx, "k")
	_, _, err12 := s.Inspect(ctx, "k")
	for i, err := range []error{err1, err2, err3, err4, err5, err6, err7, err8, err9, err10, err11, err12} {
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
