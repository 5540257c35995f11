// Package memory is the embedded store.Store: everything lives in this
// process, so it suits a single policyd instance and tests. Values follow
// Redis string semantics (a counter reads back as decimal text, a decimal
// written with Set can be incremented) so a rule behaves the same whichever
// backend is configured.
package memory

import (
	"context"
	"errors"
	"fmt"
	"hash/maphash"
	"log/slog"
	"math"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/policyd-mail/policyd/store"
)

const (
	defaultShards        = 64
	defaultSweepInterval = time.Second
)

// ErrNotInteger is returned (wrapped) by Incr when the key holds a value that
// is not a canonical decimal int64, the same values Redis INCRBY rejects.
var ErrNotInteger = errors.New("value is not an integer or out of range")

// ErrOverflow is returned (wrapped) by Incr when the result would not fit in
// an int64; the stored value is left unchanged, as in Redis.
var ErrOverflow = errors.New("increment or decrement would overflow")

// errClosed wraps store.ErrUnavailable so the engine applies its usual
// fail-open/tempfail policy to a store that is shutting down.
var errClosed = fmt.Errorf("store closed: %w", store.ErrUnavailable)

// Options configures New. The zero value is ready to use.
type Options struct {
	// Shards is how many independently locked maps the key space is split
	// across, so concurrent sessions rarely wait on one lock. It is rounded
	// up to a power of two; <= 0 means 64.
	Shards int
	// Now is the clock used for expiry, so tests can drive it. nil means
	// time.Now.
	Now func() time.Time
	// SweepInterval is how often the background sweeper reclaims expired
	// entries from the next eighth of the shards, so each shard is swept
	// every 8 intervals. 0 means 1s; negative disables the sweeper,
	// leaving reclamation to Sweep (expired entries are invisible either
	// way, and reclaimed when touched).
	SweepInterval time.Duration

	// Dir, when set, is where the store persists itself (--state-dir); use
	// Open. See persist.go for the format and the loss bound.
	Dir string
	// FlushInterval is how often journal records reach the file (what a
	// kill -9 can lose); default 200ms. SyncInterval is how often the
	// file is fsynced (what a power failure can lose); default 1s.
	FlushInterval time.Duration
	SyncInterval  time.Duration
	// CompactBytes is the journal size that triggers a new snapshot;
	// default 64 MiB, negative disables.
	CompactBytes int64
	// Logger receives recovery and I/O problems; default discards.
	Logger *slog.Logger
	// MaxJournalBuffer bounds the journal records held in memory while
	// the disk refuses writes; past it they are dropped and a snapshot is
	// written once the disk takes writes again. Default 64 MiB.
	MaxJournalBuffer int
	// MaxLoss makes Open fail when damage in the directory cost more
	// records than this (--state-max-loss); the zero value never fails.
	MaxLoss LossLimit
}

// entry is one key's value as the operations see it; the table stores it
// packed (table.go). A counter is kept as an integer so Incr on an
// existing key needs no parsing or allocation; it is turned into text
// only when read.
type entry struct {
	// val is the bytes of a kindBytes value, or the packed fields of a
	// hash (member -> lease expiry in unix ms for kindLeases); the
	// entry's own copy.
	val     string
	n       int64
	expires int64 // unix nanoseconds; 0 means no expiry
	kind    kind
}

// kind is what an entry holds.
type kind uint8

const (
	kindBytes kind = iota
	kindInt
	kindHash
	kindLeases
)

func (k kind) isString() bool { return k == kindBytes || k == kindInt }

func (e *entry) expired(now int64) bool {
	return e.expires != 0 && now >= e.expires
}

type shard struct {
	mu     sync.Mutex
	t      table
	closed bool     // set, under mu, once the Store has closed
	j      *journal // nil without persistence
	// The pad keeps neighbouring shards' locks off one cache line, so
	// sessions hitting different shards do not contend through false sharing.
	_ [64]byte
}

// Store is the in-process backend. It is safe for concurrent use. Call
// Close to stop its background sweeper.
type Store struct {
	shards []shard
	mask   uint64
	seed   maphash.Seed
	now    func() time.Time

	j          *journal // nil without persistence
	loadReport LoadReport
	interval   time.Duration
	closed     atomic.Bool
	closeOnce  sync.Once
	stop       chan struct{} // closed by Close to stop the sweeper
	done       chan struct{} // closed by the sweeper when it exits; nil if none
}

var _ store.Store = (*Store)(nil)

// New returns an empty, unpersisted Store and, unless opts.SweepInterval
// is negative, starts its background sweeper.
func New(opts Options) *Store {
	s := newStore(opts)
	s.startSweeper()
	return s
}

// Open returns a Store persisted under opts.Dir, loaded with what the
// directory holds. Damaged records are reported and skipped (recover.go),
// an error only past opts.MaxLoss; a file that cannot be read at all, or
// an unusable directory (not creatable, locked by another process), is
// an error.
func Open(opts Options) (*Store, error) {
	if opts.Dir == "" {
		return New(opts), nil
	}
	if opts.FlushInterval <= 0 {
		opts.FlushInterval = 200 * time.Millisecond
	}
	if opts.SyncInterval <= 0 {
		opts.SyncInterval = time.Second
	}
	if opts.CompactBytes == 0 {
		opts.CompactBytes = 64 << 20
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.MaxJournalBuffer <= 0 {
		opts.MaxJournalBuffer = 64 << 20
	}
	s := newStore(opts)
	if err := openJournal(s, opts); err != nil {
		return nil, err
	}
	s.startSweeper()
	return s, nil
}

func newStore(opts Options) *Store {
	n := opts.Shards
	if n <= 0 {
		n = defaultShards
	}
	size := 1
	for size < n {
		size <<= 1
	}
	s := &Store{
		shards: make([]shard, size),
		mask:   uint64(size - 1),
		// A per-Store seed: keys embed client-supplied names, and an
		// unseeded hash would let a sender pile its keys onto one shard.
		seed: maphash.MakeSeed(),
		now:  opts.Now,
	}
	if s.now == nil {
		s.now = time.Now
	}
	codec := newKeyCodec()
	for i := range s.shards {
		s.shards[i].t = table{codec: codec, seed: s.seed}
	}
	s.interval = opts.SweepInterval
	if s.interval == 0 {
		s.interval = defaultSweepInterval
	}
	return s
}

func (s *Store) startSweeper() {
	if s.interval > 0 {
		s.stop = make(chan struct{})
		s.done = make(chan struct{})
		go s.sweepLoop(s.interval)
	}
}

// shard picks a key's shard by its hash tag, as Redis Cluster picks a
// slot, so the keys of one multi-key operation sit behind one lock.
func (s *Store) shard(key string) *shard {
	return &s.shards[maphash.String(s.seed, store.HashTag(key))&s.mask]
}

func (s *Store) nowNanos() int64 {
	return s.now().UnixNano()
}

// deadline turns a ttl into an absolute expiry, 0 meaning none.
func deadline(now int64, ttl time.Duration) int64 {
	if ttl <= 0 {
		return 0
	}
	d := now + int64(ttl)
	if d < now { // a ttl so long it overflows is as good as none
		return math.MaxInt64
	}
	if d == 0 { // 0 is the "no expiry" marker; only a pre-1970 clock gets here
		return 1
	}
	return d
}

// Incr implements store.Store.
func (s *Store) Incr(ctx context.Context, key string, delta int64, ttl time.Duration) (int64, error) {
	if err := ctx.Err(); err != nil {
		return 0, fmt.Errorf("memory incr %s: %w", key, err)
	}
	now := s.nowNanos()
	n, err := s.shard(key).incr(&s.closed, key, delta, now, ttl)
	if err != nil {
		return 0, fmt.Errorf("memory incr %s: %w", key, err)
	}
	return n, nil
}

func (sh *shard) incr(closed *atomic.Bool, key string, delta, now int64, ttl time.Duration) (int64, error) {
	sh.mu.Lock()
	defer sh.mu.Unlock()
	// Checked under the lock so nothing slips in after Close empties the shard.
	if closed.Load() {
		return 0, errClosed
	}
	e, ok := sh.t.get(key)
	switch {
	case !ok || e.expired(now):
		e = entry{kind: kindInt, expires: deadline(now, ttl)}
	case !e.kind.isString():
		return 0, store.ErrWrongType
	case e.kind == kindBytes:
		v, ok := parseInt([]byte(e.val))
		if !ok {
			return 0, ErrNotInteger
		}
		e = entry{kind: kindInt, n: v, expires: e.expires}
	}
	sum := e.n + delta
	if (delta > 0 && sum < e.n) || (delta < 0 && sum > e.n) {
		return 0, ErrOverflow
	}
	e.n = sum
	if err := sh.set(key, e); err != nil {
		return 0, err
	}
	return sum, nil
}

// Get implements store.Store. The returned slice is the caller's own.
func (s *Store) Get(ctx context.Context, key string) ([]byte, bool, error) {
	if err := ctx.Err(); err != nil {
		return nil, false, fmt.Errorf("memory get %s: %w", key, err)
	}
	now := s.nowNanos()
	sh := s.shard(key)
	sh.mu.Lock()
	if s.closed.Load() {
		sh.mu.Unlock()
		return nil, false, fmt.Errorf("memory get %s: %w", key, errClosed)
	}
	// An expired entry is reclaimed now rather than by the sweeper: we
	// hold the lock anyway.
	e, ok := sh.live(key, now)
	sh.mu.Unlock()
	if !ok {
		return nil, false, nil
	}
	if !e.kind.isString() {
		return nil, false, fmt.Errorf("memory get %s: %w", key, store.ErrWrongType)
	}
	if e.kind == kindInt {
		return strconv.AppendInt(make([]byte, 0, 20), e.n, 10), true, nil
	}
	return []byte(e.val), true, nil
}

// Set implements store.Store. value is copied, so the caller may reuse it.
func (s *Store) Set(ctx context.Context, key string, value []byte, ttl time.Duration) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("memory set %s: %w", key, err)
	}
	// Copied before locking to keep the allocation out of the critical section.
	v := string(value)
	now := s.nowNanos()
	sh := s.shard(key)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if s.closed.Load() {
		return fmt.Errorf("memory set %s: %w", key, errClosed)
	}
	if err := sh.set(key, entry{val: v, expires: deadline(now, ttl)}); err != nil {
		return fmt.Errorf("memory set %s: %w", key, err)
	}
	return nil
}

// Delete implements store.Store.
func (s *Store) Delete(ctx context.Context, keys ...string) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("memory delete: %w", err)
	}
	for _, key := range keys {
		sh := s.shard(key)
		sh.mu.Lock()
		if s.closed.Load() {
			sh.mu.Unlock()
			return fmt.Errorf("memory delete %s: %w", key, errClosed)
		}
		sh.remove(key)
		sh.mu.Unlock()
	}
	return nil
}

// Close stops the background sweeper, waiting for it to exit, and drops
// every entry. Later operations fail with store.ErrUnavailable. Close is
// idempotent and always returns nil.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.closed.Store(true)
		if s.stop != nil {
			close(s.stop)
			<-s.done
		}
		if s.j != nil {
			s.j.close(s)
		}
		for i := range s.shards {
			sh := &s.shards[i]
			sh.mu.Lock()
			sh.closed = true
			sh.t.free()
			sh.mu.Unlock()
		}
	})
	return nil
}

// Sweep reclaims every entry that has expired by now, one shard at a time.
// The background sweeper does the same, a share of the shards per tick; Sweep lets tests with a fake clock,
// or a Store without a sweeper, reclaim on demand.
func (s *Store) Sweep() {
	s.sweep(nil)
}

// Len reports how many entries the Store holds, including expired ones not
// yet reclaimed, so it measures memory rather than visible keys.
func (s *Store) Len() int {
	total := 0
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		total += sh.t.len()
		sh.mu.Unlock()
	}
	return total
}

// Stats is what the Store holds, for sizing and for the metrics.
type Stats struct {
	Records     int // including expired ones not yet reclaimed
	IndexBytes  int // the hash index's slots
	RecordBytes int // the records, dead ones included
	DeadBytes   int // records replaced or deleted, reclaimed by compaction
}

// Stats adds up every shard's figures, one shard lock at a time.
func (s *Store) Stats() Stats {
	var st Stats
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		st.Records += sh.t.used
		st.IndexBytes += len(sh.t.slots) * 8
		st.RecordBytes += sh.t.top
		st.DeadBytes += sh.t.dead
		sh.mu.Unlock()
	}
	return st
}

func (s *Store) sweepLoop(interval time.Duration) {
	defer close(s.done)
	t := time.NewTicker(interval)
	defer t.Stop()
	next := 0
	for {
		select {
		case <-s.stop:
			return
		case <-t.C:
			next = s.sweepSome(s.stop, next)
		}
	}
}

// sweepPasses is how many ticks one pass over every shard takes: walking a
// store of millions of records every second cost a tenth of the daemon's
// CPU, and the records due meanwhile are reclaimed when touched anyway.
const sweepPasses = 8

// sweepSome sweeps the next share of the shards, from first, and returns
// where the next tick starts.
func (s *Store) sweepSome(stop <-chan struct{}, first int) int {
	n := max(1, len(s.shards)/sweepPasses)
	for i := range n {
		if stop != nil {
			select {
			case <-stop:
				return first
			default:
			}
		}
		s.shards[(first+i)%len(s.shards)].sweep(s.nowNanos())
	}
	return (first + n) % len(s.shards)
}

// sweep walks every shard one lock at a time, so sessions only ever wait
// for one shard's scan.
func (s *Store) sweep(stop <-chan struct{}) {
	for i := range s.shards {
		if stop != nil {
			select {
			case <-stop:
				return
			default:
			}
		}
		s.shards[i].sweep(s.nowNanos())
	}
}

func (sh *shard) sweep(now int64) {
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if !sh.closed {
		sh.t.sweep(now)
	}
}

// parseInt accepts exactly what Redis's string2ll does (optional '-', no
// '+', no leading zeros, no spaces, within int64), so a value written with
// Set is incrementable here if and only if it would be in Redis.
func parseInt(b []byte) (int64, bool) {
	if len(b) == 1 && b[0] == '0' {
		return 0, true
	}
	neg := len(b) > 0 && b[0] == '-'
	if neg {
		b = b[1:]
	}
	// 19 digits always fit in a uint64, so the loop needs no overflow check.
	if len(b) == 0 || len(b) > 19 || b[0] < '1' || b[0] > '9' {
		return 0, false
	}
	var u uint64
	for _, c := range b {
		if c < '0' || c > '9' {
			return 0, false
		}
		u = u*10 + uint64(c-'0')
	}
	if neg {
		if u > uint64(math.MaxInt64)+1 {
			return 0, false
		}
		return int64(-u), true
	}
	if u > math.MaxInt64 {
		return 0, false
	}
	return int64(u), true
}
