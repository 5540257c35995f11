package memory

import (
	"fmt"
	"log/slog"
	"sync"
	"time"
)

// health is whether what the store holds is reaching the disk. It lives
// in the journal, under its mu.
type health struct {
	// persistedAt: every update made before it is in the state files.
	persistedAt time.Time
	failing     bool // the last write or fsync failed
	lastErr     string
	// snapshotOwed: buffered records were dropped, so only a snapshot
	// can put the disk level with memory again.
	snapshotOwed                 bool
	droppedRecords, droppedBytes int64
}

// failed records a write that did not reach the disk.
func (j *journal) failed(started time.Time, err error) {
	j.mu.Lock()
	j.health.failing = true
	j.health.lastErr = err.Error()
	since, buffered := j.health.persistedAt, len(j.buf)
	j.mu.Unlock()
	j.logs.error("write", "state not persisted: the journal cannot be written; the records are kept in memory (up to the buffer's bound) and retried",
		"dir", j.dir, "err", err, "persisted_until", since.UTC().Format(time.RFC3339), "buffered_bytes", buffered)
}

// persisted records that everything buffered before started is written;
// wrote says whether the disk took a write or fsync in doing so.
func (j *journal) persisted(started time.Time, wrote bool) {
	j.mu.Lock()
	was := j.health.failing
	if was && !wrote {
		j.mu.Unlock()
		return
	}
	j.health.failing, j.health.lastErr = false, ""
	if !j.health.snapshotOwed {
		j.health.persistedAt = started
	}
	j.mu.Unlock()
	if was {
		j.log.Info("state journal writes work again", "dir", j.dir)
	}
}

// snapshotWritten records a snapshot holding every update made before
// started.
func (j *journal) snapshotWritten(started time.Time) {
	j.mu.Lock()
	owed := j.health.snapshotOwed
	j.health.snapshotOwed = false
	if owed && started.After(j.health.persistedAt) {
		j.health.persistedAt = started
	}
	dropped := j.health.droppedRecords
	j.mu.Unlock()
	if owed {
		j.log.Info("state persisted again: a snapshot holds the records the journal had to drop", "dir", j.dir, "dropped_records_total", dropped)
	}
}

// Persistence is how the state directory is keeping up.
type Persistence struct {
	// PersistedAt: every update made before it is in the state files.
	PersistedAt time.Time
	// Behind says why the disk is behind memory, or is "".
	Behind string
	// BufferBytes are journal records waiting to be written.
	BufferBytes int
	// DroppedRecords and DroppedBytes count journal records dropped
	// since start-up because the disk refused writes past the buffer's
	// bound (a snapshot then writes the store whole).
	DroppedRecords, DroppedBytes int64
}

// Persistence reports on the state directory; the zero value without one.
func (s *Store) Persistence() Persistence {
	j := s.j
	if j == nil {
		return Persistence{}
	}
	j.mu.Lock()
	defer j.mu.Unlock()
	h := j.health
	p := Persistence{PersistedAt: h.persistedAt, BufferBytes: len(j.buf), DroppedRecords: h.droppedRecords, DroppedBytes: h.droppedBytes}
	switch {
	case h.failing:
		p.Behind = h.lastErr
	case h.snapshotOwed:
		p.Behind = fmt.Sprintf("%d journal records dropped while the disk refused writes, a snapshot is pending", h.droppedRecords)
	}
	return p
}

// Degraded lists what an admin should know about the state directory,
// for /readyz; nil when all is well. None of it stops mail: the store
// answers from memory whatever the disk does.
func (s *Store) Degraded() []string {
	var out []string
	if p := s.Persistence(); p.Behind != "" {
		out = append(out, fmt.Sprintf("state not persisted since %s: %s", p.PersistedAt.UTC().Format(time.RFC3339), p.Behind))
	}
	if r := s.LoadReport(); r.Damaged() {
		out = append(out, fmt.Sprintf("state loaded with damage at start-up (%s; kept: %v)", lostText(r), r.Kept))
	}
	return out
}

// limitedLog writes an error of each kind at most once per logEvery, with
// how many of that kind were held back: a full disk fails every few
// hundred milliseconds for as long as it lasts.
type limitedLog struct {
	log        *slog.Logger
	mu         sync.Mutex
	last       map[string]time.Time
	suppressed map[string]int
}

const logEvery = 30 * time.Second

func (l *limitedLog) error(kind, msg string, args ...any) {
	l.mu.Lock()
	if l.last == nil {
		l.last, l.suppressed = map[string]time.Time{}, map[string]int{}
	}
	if t, ok := l.last[kind]; ok && time.Since(t) < logEvery {
		l.suppressed[kind]++
		l.mu.Unlock()
		return
	}
	l.last[kind] = time.Now()
	n := l.suppressed[kind]
	l.suppressed[kind] = 0
	l.mu.Unlock()
	if n > 0 {
		args = append(args, "suppressed", n)
	}
	l.log.Error(msg, args...)
}
