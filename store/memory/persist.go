package memory

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/policyd-mail/policyd/internal/ratelog"
)

// Persistence: the map stays the store; a journal records the resulting
// state of every key a write touches, and a snapshot now and then lets the
// journal start over. Records are idempotent (a key's whole state, or its
// deletion), so recovery is "load the snapshot, replay newer journals",
// and a key written while a snapshot is taken is simply replayed.
//
// Loss bound: the journal buffer goes to the file every FlushInterval
// (default 200 ms), so a kill -9 loses at most that much; it is fsynced
// every SyncInterval (default 1 s), which bounds the loss on power failure.
//
// Files in the state directory:
//
//	LOCK           flock'd while a Store has the directory open
//	snapshot       header record, one put record per live key, trailer
//	journal.<gen>  put/delete records, gen counting up from 1
//
//	snapshot.damaged.<time>, journal.<gen>.damaged.<time>
//	               files that start-up found damaged, kept for the admin
//
// Each record is framed as: uint32 length, uint32 CRC-32C of the payload,
// payload; the snapshot's last record is a trailer with its record count.
// Damage costs the records it is in and no more (recover.go).

const (
	opPut = 'P'
	opDel = 'D'

	snapshotMagic = "policyd-snapshot-2"
	// snapshotMagic1 is the format before the trailer, still read.
	snapshotMagic1 = "policyd-snapshot-1"
	maxRecord      = 16 << 20 // a record larger than this is corruption
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// journal is the write side of persistence.
type journal struct {
	dir           string
	log           *slog.Logger
	flushInterval time.Duration
	syncInterval  time.Duration
	compactBytes  int64

	mu  sync.Mutex // guards buf, spare, pending and the health below
	buf []byte
	// pending counts the records in buf, so a drop can say what it cost.
	pending int
	// maxBuffer bounds buf while writes fail (a full disk): past it the
	// buffered records are dropped, and a snapshot, which the store's
	// memory still has everything for, is owed once writes succeed.
	maxBuffer int
	health    health
	// spare is the buffer flush last wrote out, handed back to buf at the
	// next flush: records are appended at the rate of mail, and a fresh
	// buffer each flush was a third of all allocation on the mail path.
	spare   []byte
	scratch []byte // encoding space, used under the shard lock of the caller

	fmu  sync.Mutex // guards the files below (flusher, snapshot, Close)
	gen  uint64
	f    *os.File
	size int64
	// snapSize is the last snapshot's size in bytes.
	snapSize atomic.Int64
	lock     *os.File
	// snapRetry is when a failed snapshot may be tried again, and
	// snapBackoff the wait after the next failure; run loop only.
	snapRetry   time.Time
	snapBackoff time.Duration
	// writeLog and snapLog rate-limit the write and snapshot errors.
	writeLog, snapLog *ratelog.Limiter

	stop chan struct{}
	done chan struct{}
}

// appendRecord frames payload into dst.
func appendRecord(dst, payload []byte) []byte {
	dst = binary.LittleEndian.AppendUint32(dst, uint32(len(payload)))
	dst = binary.LittleEndian.AppendUint32(dst, crc32.Checksum(payload, crcTable))
	return append(dst, payload...)
}

// encodeEntry appends a put record's payload for key.
func encodeEntry(dst []byte, key string, e entry) []byte {
	dst = append(dst, opPut)
	dst = binary.AppendUvarint(dst, uint64(len(key)))
	dst = append(dst, key...)
	dst = append(dst, byte(e.kind))
	dst = binary.AppendVarint(dst, e.expires)
	switch e.kind {
	case kindBytes:
		dst = binary.AppendUvarint(dst, uint64(len(e.val)))
		dst = append(dst, e.val...)
	case kindInt:
		dst = binary.AppendVarint(dst, e.n)
	case kindHash, kindLeases:
		// The record format predates packed fields: a count, then the
		// fields as they are packed.
		dst = binary.AppendUvarint(dst, uint64(fieldCount(e.val)))
		dst = append(dst, e.val...)
	}
	return dst
}

func encodeDelete(dst []byte, key string) []byte {
	dst = append(dst, opDel)
	dst = binary.AppendUvarint(dst, uint64(len(key)))
	return append(dst, key...)
}

// put records key's new state. Called with the key's shard locked, so
// records of one key reach the journal in the order they happened.
func (j *journal) put(key string, e entry) {
	j.mu.Lock()
	j.scratch = encodeEntry(j.scratch[:0], key, e)
	j.buf = appendRecord(j.buf, j.scratch)
	j.appended()
	j.mu.Unlock()
}

// appended counts a record into buf and, when writes are failing and
// buf is over its bound, drops it. Called with mu held.
func (j *journal) appended() {
	j.pending++
	if j.health.failing && len(j.buf) > j.maxBuffer {
		j.health.droppedRecords += int64(j.pending)
		j.health.droppedBytes += int64(len(j.buf))
		if !j.health.snapshotOwed {
			// Said once per outage, by the flusher: this runs under the
			// caller's shard lock.
			j.health.dropNotice = [2]int{len(j.buf), j.pending}
		}
		j.health.owe()
		j.buf, j.pending = j.buf[:0], 0
	}
}

// del records key's deletion, under its shard lock like put.
func (j *journal) del(key string) {
	j.mu.Lock()
	j.scratch = encodeDelete(j.scratch[:0], key)
	j.buf = appendRecord(j.buf, j.scratch)
	j.appended()
	j.mu.Unlock()
}

// decodeRecord reads one payload.
func decodeRecord(p []byte) (op byte, key string, e entry, err error) {
	bad := errMalformed
	if len(p) == 0 {
		return 0, "", e, bad
	}
	op, p = p[0], p[1:]
	klen, n := binary.Uvarint(p)
	if n <= 0 || uint64(len(p)-n) < klen {
		return 0, "", e, bad
	}
	key, p = string(p[n:n+int(klen)]), p[n+int(klen):]
	if op == opDel {
		return op, key, e, nil
	}
	if op != opPut || len(p) == 0 {
		return 0, "", e, bad
	}
	e.kind, p = kind(p[0]), p[1:]
	if e.expires, n = binary.Varint(p); n <= 0 {
		return 0, "", e, bad
	}
	p = p[n:]
	switch e.kind {
	case kindBytes:
		l, n := binary.Uvarint(p)
		if n <= 0 || uint64(len(p)-n) < l {
			return 0, "", e, bad
		}
		e.val = string(p[n : n+int(l)])
	case kindInt:
		if e.n, n = binary.Varint(p); n <= 0 {
			return 0, "", e, bad
		}
	case kindHash, kindLeases:
		count, n := binary.Uvarint(p)
		if n <= 0 || count > uint64(len(p)) {
			return 0, "", e, bad
		}
		p = p[n:]
		var buf []byte
		for range count {
			l, n := binary.Uvarint(p)
			if n <= 0 || uint64(len(p)-n) < l {
				return 0, "", e, bad
			}
			f := string(p[n : n+int(l)])
			p = p[n+int(l):]
			v, m := binary.Varint(p)
			if m <= 0 {
				return 0, "", e, bad
			}
			p = p[m:]
			buf = appendField(buf, f, v)
		}
		e.val = string(buf)
	default:
		return 0, "", e, bad
	}
	return op, key, e, nil
}

// openJournal locks dir, loads its state into s, and starts a new journal
// generation. Damaged records are reported and skipped: a damaged state
// directory must not keep mail from flowing unless the admin set a limit
// (recover.go).
func openJournal(s *Store, opts Options) error {
	if err := os.MkdirAll(opts.Dir, 0o700); err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	lock, err := os.OpenFile(filepath.Join(opts.Dir, "LOCK"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("state directory: %w", err)
	}
	if err := syscall.Flock(int(lock.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		lock.Close()
		return fmt.Errorf("state directory %s is in use by another policyd: %w", opts.Dir, err)
	}
	j := &journal{
		dir: opts.Dir, log: opts.Logger, lock: lock,
		flushInterval: opts.FlushInterval, syncInterval: opts.SyncInterval, compactBytes: opts.CompactBytes,
		maxBuffer: opts.MaxJournalBuffer,
		stop:      make(chan struct{}), done: make(chan struct{}),
	}
	j.writeLog, j.snapLog = ratelog.New(logEvery), ratelog.New(logEvery)
	j.health.persistedAt = time.Now()
	maxGen, rep, err := j.recover(s, opts.MaxLoss)
	s.loadReport = rep
	if err == nil {
		j.gen = maxGen + 1
		err = j.openGen()
	}
	if err != nil {
		// The tables are mapped outside the Go heap: nobody else frees them.
		for i := range s.shards {
			s.shards[i].t.free()
		}
		lock.Close()
		return err
	}
	for i := range s.shards {
		s.shards[i].j = j
	}
	s.j = j
	go j.run(s)
	return nil
}

// journalGens lists the journal generations present, in order.
func (j *journal) journalGens() []uint64 {
	names, _ := filepath.Glob(filepath.Join(j.dir, "journal.*"))
	var gens []uint64
	for _, n := range names {
		if g, err := strconv.ParseUint(strings.TrimPrefix(filepath.Base(n), "journal."), 10, 64); err == nil {
			gens = append(gens, g)
		}
	}
	sort.Slice(gens, func(a, b int) bool { return gens[a] < gens[b] })
	return gens
}

func (j *journal) openGen() error {
	f, err := createGen(j.dir, j.gen)
	if err != nil {
		return fmt.Errorf("state journal: %w", err)
	}
	j.f, j.size = f, 0
	return nil
}

// createGen opens journal generation gen of dir for appending.
func createGen(dir string, gen uint64) (*os.File, error) {
	name := filepath.Join(dir, "journal."+strconv.FormatUint(gen, 10))
	f, err := os.OpenFile(name, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	// The new file's name must survive a power failure too.
	syncDir(dir)
	return f, nil
}

// syncDir makes the creation or renaming of a file in dir durable.
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}

// run flushes the buffer every flushInterval, fsyncs every syncInterval,
// and snapshots when the journal has grown or a dropped buffer is owed.
func (j *journal) run(s *Store) {
	defer close(j.done)
	flush := time.NewTicker(j.flushInterval)
	defer flush.Stop()
	lastSync := time.Now()
	// A snapshot of millions of records takes seconds: it is written on
	// a goroutine of its own, so the journal goes on reaching the file
	// every flushInterval meanwhile and the loss bound holds during it.
	var snapDone chan error // nil while no snapshot is being written
	for {
		select {
		case <-j.stop:
			if snapDone != nil {
				<-snapDone
			}
			return
		case err := <-snapDone:
			snapDone = nil
			if err != nil {
				// A full disk fails every try: wait longer each time
				// instead of rotating a new journal every tick.
				j.snapBackoff = min(max(2*j.snapBackoff, snapshotRetryMin), snapshotRetryMax)
				j.snapRetry = time.Now().Add(j.snapBackoff)
				j.logLimited(j.snapLog, "state snapshot failed; the journals are kept, next try later", "err", err, "retry_in", j.snapBackoff)
			} else {
				j.snapBackoff = 0
			}
		case <-flush.C:
			sync := time.Since(lastSync) >= j.syncInterval
			if sync {
				lastSync = time.Now()
			}
			if j.flush(sync) {
				// An owed snapshot goes out now, not after the backoff
				// the outage built up.
				j.snapRetry, j.snapBackoff = time.Time{}, 0
			}
			if snapDone != nil || time.Now().Before(j.snapRetry) {
				continue
			}
			// A snapshot costs the store's size, so it waits for a journal
			// at least as big as the last snapshot: the rewriting stays a
			// constant share of the updates however many clients there are.
			due := j.compactBytes > 0 && j.journalSize() > max(j.compactBytes, j.snapSize.Load())
			if due || j.snapshotOwed() {
				snapDone = make(chan error, 1)
				go func(done chan error) { done <- j.snapshot(s) }(snapDone)
			}
		}
	}
}

// Waits between failed snapshots; variables so tests can shorten them.
var (
	snapshotRetryMin = 5 * time.Second
	snapshotRetryMax = 5 * time.Minute
)

func (j *journal) snapshotOwed() bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	return j.health.snapshotOwed
}

func (j *journal) journalSize() int64 {
	j.fmu.Lock()
	defer j.fmu.Unlock()
	return j.size
}

const maxSpare = 16 << 20

// flush writes the buffered records; on a write error the records are
// kept for the next try (up to maxBuffer) and the error is logged at a
// bounded rate.
// It reports whether the disk took writes again after failing.
func (j *journal) flush(sync bool) (recovered bool) {
	j.fmu.Lock()
	defer j.fmu.Unlock()
	return j.flushLocked(sync) == errRecovered
}

// flushLocked is flush with fmu held.
func (j *journal) flushLocked(sync bool) error {
	started := time.Now()
	j.mu.Lock()
	buf, pending := j.buf, j.pending
	j.buf, j.spare, j.pending = j.spare[:0], nil, 0
	j.mu.Unlock()
	var err error
	if len(buf) > 0 {
		var n int
		n, err = j.f.Write(buf)
		j.size += int64(n)
		if err != nil {
			// The unwritten part goes back in front of what came since;
			// a record cut by the short write is resynchronised past on
			// reading.
			j.mu.Lock()
			j.buf = append(buf[n:], j.buf...)
			j.pending += pending
			j.mu.Unlock()
			err = fmt.Errorf("journal write: %w", err)
			j.failed(started, err)
			return err
		}
	}
	// A burst's big buffer is not kept for ever.
	if cap(buf) <= maxSpare {
		j.mu.Lock()
		j.spare = buf[:0]
		j.mu.Unlock()
	}
	if sync {
		if err := j.f.Sync(); err != nil {
			// Linux may mark the pages clean after a failed fsync, so a
			// later one "succeeds" without them: only a snapshot is sure.
			j.mu.Lock()
			j.health.owe()
			j.mu.Unlock()
			err = fmt.Errorf("journal fsync: %w", err)
			j.failed(started, err)
			return err
		}
	}
	// An empty buffer proves nothing about the disk, but leaves nothing
	// unwritten either.
	if j.persisted(started, len(buf) > 0 || sync) {
		return errRecovered
	}
	return nil
}

// errRecovered is flushLocked's "written, and the disk had been failing".
var errRecovered = errors.New("journal writes work again")

// snapshot writes every live key to a new snapshot covering the journal
// generations up to the current one, then removes those journals.
func (j *journal) snapshot(s *Store) error {
	started := time.Now()
	// The last flush into the generation the snapshot will cover, its
	// fsync and the rotation are one step: a flush by the run loop in
	// between would leave records in that generation that nothing fsyncs
	// before the snapshot is done.
	j.fmu.Lock()
	if err := j.flushLocked(true); err != nil && err != errRecovered {
		// Rotating now would only add a generation per try.
		j.fmu.Unlock()
		return err
	}
	covered := j.gen
	// The next generation is opened before the current one is let go: if
	// it cannot be (a full disk), writing goes on where it was.
	next, err := createGen(j.dir, covered+1)
	if err != nil {
		j.fmu.Unlock()
		return fmt.Errorf("journal rotation: %w", err)
	}
	j.f.Close()
	j.gen, j.f, j.size = covered+1, next, 0
	// A drop from here on leaves a hole in a generation this snapshot
	// does not cover: it must not clear what is owed.
	j.mu.Lock()
	owedAt := j.health.owedSeq
	j.mu.Unlock()
	j.fmu.Unlock()
	if err := j.writeSnapshot(s, covered); err != nil {
		return err
	}
	for _, g := range j.journalGens() {
		if g <= covered {
			os.Remove(filepath.Join(j.dir, "journal."+strconv.FormatUint(g, 10)))
		}
	}
	j.snapshotWritten(started, owedAt)
	return nil
}

// snapshotPause, when set, is called as a snapshot starts: tests use it
// to hold a snapshot open.
var snapshotPause atomic.Pointer[func()]

func (j *journal) writeSnapshot(s *Store, covered uint64) error {
	tmp := filepath.Join(j.dir, "snapshot.tmp")
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	defer os.Remove(tmp) // after a successful rename there is nothing left to remove
	bw := bufio.NewWriterSize(f, 256<<10)
	var rec, payload []byte
	rec = appendRecord(rec, []byte(snapshotMagic+" "+strconv.FormatUint(covered, 10)))
	bw.Write(rec)
	now := s.nowNanos()
	if p := snapshotPause.Load(); p != nil {
		(*p)()
	}
	count := 0
	for i := range s.shards {
		sh := &s.shards[i]
		sh.mu.Lock()
		sh.t.all(func(packed []byte, expires int64, e func() entry) {
			if expires != 0 && now >= expires {
				return
			}
			payload = encodeEntry(payload[:0], sh.t.codec.unpack(packed), e())
			rec = appendRecord(rec[:0], payload)
			bw.Write(rec)
			count++
		})
		sh.mu.Unlock()
	}
	// The trailer lets a reader count exactly what damage cost.
	rec = appendRecord(rec[:0], fmt.Appendf(nil, "%s %d %d", snapshotTrailer, covered, count))
	bw.Write(rec)
	if err := bw.Flush(); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if fi, err := os.Stat(tmp); err == nil {
		j.snapSize.Store(fi.Size())
	}
	if err := os.Rename(tmp, filepath.Join(j.dir, "snapshot")); err != nil {
		return err
	}
	// Make the rename itself durable.
	syncDir(j.dir)
	return nil
}

// close flushes, snapshots (so the next start reads one compact file)
// and releases the directory.
func (j *journal) close(s *Store) {
	close(j.stop)
	<-j.done
	if err := j.snapshot(s); err != nil {
		j.log.Error("state snapshot at stop failed; the journals are kept", "err", err)
	}
	j.fmu.Lock()
	j.f.Close()
	j.fmu.Unlock()
	j.lock.Close()
}
