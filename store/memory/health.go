package memory

import (
	"fmt"
	"time"

	"github.com/policyd-mail/policyd/internal/ratelog"
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
	// owedSeq counts the events that owed a snapshot, so a snapshot
	// clears only what happened before its rotation.
	owedSeq uint64
	// dropNotice: the buffer and records of the first drop of an
	// outage, to be logged outside the locks; zero once logged.
	dropNotice [2]int
}

// owe records that only a snapshot can put the disk level with memory.
func (h *health) owe() {
	h.snapshotOwed = true
	h.owedSeq++
}

// failed records a write that did not reach the disk.
func (j *journal) failed(started time.Time, err error) {
	j.mu.Lock()
	j.health.failing = true
	j.health.lastErr = err.Error()
	since, buffered := j.health.persistedAt, len(j.buf)
	notice := j.health.dropNotice
	j.health.dropNotice = [2]int{}
	j.mu.Unlock()
	if notice[0] > 0 {
		j.log.Error("state journal buffer full while the disk refuses writes: dropping buffered records; the store keeps them in memory and a snapshot will write them when the disk takes writes again",
			"dir", j.dir, "buffer_bytes", notice[0], "records", notice[1])
	}
	j.logLimited(j.writeLog, "state not persisted: the journal cannot be written; the records are kept in memory (up to the buffer's bound) and retried",
		"dir", j.dir, "err", err, "persisted_until", since.UTC().Format(time.RFC3339), "buffered_bytes", buffered)
}

// persisted records that everything buffered before started is written;
// wrote says whether the disk took a write or fsync in doing so. It
// reports whether the disk had been failing.
func (j *journal) persisted(started time.Time, wrote bool) (recovered bool) {
	j.mu.Lock()
	was := j.health.failing
	if was && !wrote {
		j.mu.Unlock()
		return false
	}
	j.health.failing, j.health.lastErr = false, ""
	if !j.health.snapshotOwed {
		j.health.persistedAt = started
	}
	j.mu.Unlock()
	if was {
		j.log.Info("state journal writes work again", "dir", j.dir)
	}
	return was
}

// snapshotWritten records a snapshot holding every update made before
// started, which rotated the journal when owedSeq was owedAt.
func (j *journal) snapshotWritten(started time.Time, owedAt uint64) {
	j.mu.Lock()
	owed := j.health.snapshotOwed
	if j.health.owedSeq != owedAt {
		// Owed again since the rotation: the next snapshot pays it.
		j.mu.Unlock()
		return
	}
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

// Persisted reports whether the store has a state directory.
func (s *Store) Persisted() bool { return s.j != nil }

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

// logEvery bounds the write and snapshot errors to one line each per
// interval, with how many were held back: a full disk fails every few
// hundred milliseconds for as long as it lasts.
const logEvery = 30 * time.Second

// logLimited logs an error through lim.
func (j *journal) logLimited(lim *ratelog.Limiter, msg string, args ...any) {
	if n, ok := lim.Allow(time.Now()); ok {
		j.log.Error(msg, append(args, "suppressed", n)...)
	}
}
