package memory

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
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
//	snapshot       header record, then one put record per live key
//	journal.<gen>  put/delete records, gen counting up from 1
//
// Each record is framed as: uint32 length, uint32 CRC-32C of the payload,
// payload. A torn or corrupt record ends the file it is in: what came
// before is kept, the problem is logged, start-up goes on.

const (
	opPut = 'P'
	opDel = 'D'

	snapshotMagic = "policyd-snapshot-1"
	maxRecord     = 16 << 20 // a record larger than this is corruption
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// journal is the write side of persistence.
type journal struct {
	dir           string
	log           *slog.Logger
	flushInterval time.Duration
	syncInterval  time.Duration
	compactBytes  int64

	mu  sync.Mutex // guards buf and spare
	buf []byte
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
	lastErr  time.Time

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
	j.mu.Unlock()
}

// del records key's deletion, under its shard lock like put.
func (j *journal) del(key string) {
	j.mu.Lock()
	j.scratch = encodeDelete(j.scratch[:0], key)
	j.buf = appendRecord(j.buf, j.scratch)
	j.mu.Unlock()
}

// decodeRecord reads one payload.
func decodeRecord(p []byte) (op byte, key string, e entry, err error) {
	bad := errors.New("malformed record")
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

// readRecords calls fn for every intact record of r; it returns why it
// stopped early, nil at a clean end.
func readRecords(r io.Reader, fn func(payload []byte) error) error {
	br := bufio.NewReaderSize(r, 64<<10)
	var hdr [8]byte
	var payload []byte
	for n := 0; ; n++ {
		if _, err := io.ReadFull(br, hdr[:]); err != nil {
			if errors.Is(err, io.EOF) {
				return nil
			}
			return fmt.Errorf("record %d: torn header", n)
		}
		l := binary.LittleEndian.Uint32(hdr[:4])
		if l > maxRecord {
			return fmt.Errorf("record %d: length %d is corrupt", n, l)
		}
		if cap(payload) < int(l) {
			payload = make([]byte, l)
		}
		payload = payload[:l]
		if _, err := io.ReadFull(br, payload); err != nil {
			return fmt.Errorf("record %d: torn (%d bytes announced)", n, l)
		}
		if crc32.Checksum(payload, crcTable) != binary.LittleEndian.Uint32(hdr[4:]) {
			return fmt.Errorf("record %d: checksum mismatch", n)
		}
		if err := fn(payload); err != nil {
			return fmt.Errorf("record %d: %w", n, err)
		}
	}
}

// openJournal locks dir, loads its state into s, and starts a new journal
// generation. Problems with the files are logged and skipped: a damaged
// state directory must never keep mail from flowing.
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
		stop: make(chan struct{}), done: make(chan struct{}),
	}
	maxGen, err := j.recover(s)
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

// recover loads the snapshot and replays newer journals into s. It
// returns the highest generation seen. Damaged files are logged and
// skipped; the only error is running out of memory, which must stop
// start-up rather than be taken for damage (the next snapshot would
// then drop the records not loaded).
func (j *journal) recover(s *Store) (uint64, error) {
	start := time.Now()
	now := s.nowNanos()
	var fatal error
	apply := func(payload []byte) error {
		op, key, e, err := decodeRecord(payload)
		if err != nil {
			return err
		}
		sh := s.shard(key)
		if op == opDel || e.expired(now) {
			sh.t.del(key)
			return nil
		}
		if err := sh.t.put(key, e); err != nil {
			fatal = fmt.Errorf("loading state from %s: %w", j.dir, err)
			return fatal
		}
		return nil
	}
	var covered uint64
	loaded := 0
	if f, err := os.Open(filepath.Join(j.dir, "snapshot")); err == nil {
		if fi, err := f.Stat(); err == nil {
			j.snapSize.Store(fi.Size())
		}
		first := true
		err := readRecords(f, func(p []byte) error {
			if first {
				first = false
				magic, gen, ok := strings.Cut(string(p), " ")
				g, perr := strconv.ParseUint(gen, 10, 64)
				if !ok || magic != snapshotMagic || perr != nil {
					return errors.New("not a policyd snapshot")
				}
				covered = g
				return nil
			}
			loaded++
			return apply(p)
		})
		f.Close()
		if fatal != nil {
			return 0, fatal
		}
		if err != nil {
			j.log.Error("state snapshot damaged; starting from what could be read and the journals", "file", f.Name(), "err", err, "keys", loaded)
		}
	} else if !errors.Is(err, os.ErrNotExist) {
		j.log.Error("state snapshot unreadable; starting from the journals", "err", err)
	}
	maxGen := covered
	replayed := 0
	for _, g := range j.journalGens() {
		maxGen = max(maxGen, g)
		if g <= covered {
			continue
		}
		name := filepath.Join(j.dir, "journal."+strconv.FormatUint(g, 10))
		f, err := os.Open(name)
		if err != nil {
			j.log.Error("state journal unreadable; skipped", "file", name, "err", err)
			continue
		}
		err = readRecords(f, func(p []byte) error { replayed++; return apply(p) })
		f.Close()
		if fatal != nil {
			return 0, fatal
		}
		if err != nil {
			j.log.Error("state journal damaged; kept the records before the damage", "file", name, "err", err)
		}
	}
	j.log.Info("state loaded", "dir", j.dir, "keys", s.Len(), "snapshot_records", loaded, "journal_records", replayed, "took", time.Since(start).Round(time.Millisecond))
	return maxGen, nil
}

func (j *journal) openGen() error {
	name := filepath.Join(j.dir, "journal."+strconv.FormatUint(j.gen, 10))
	f, err := os.OpenFile(name, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("state journal: %w", err)
	}
	j.f, j.size = f, 0
	// The new file's name must survive a power failure too.
	syncDir(j.dir)
	return nil
}

// syncDir makes the creation or renaming of a file in dir durable.
func syncDir(dir string) {
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}

// run flushes the buffer every flushInterval, fsyncs every syncInterval,
// and compacts when the journal has grown.
func (j *journal) run(s *Store) {
	defer close(j.done)
	flush := time.NewTicker(j.flushInterval)
	defer flush.Stop()
	lastSync := time.Now()
	// A snapshot of millions of records takes seconds: it is written on
	// a goroutine of its own, so the journal goes on reaching the file
	// every flushInterval meanwhile and the loss bound holds during it.
	var snapDone chan struct{} // nil while no snapshot is being written
	for {
		select {
		case <-j.stop:
			if snapDone != nil {
				<-snapDone
			}
			return
		case <-snapDone:
			snapDone = nil
		case <-flush.C:
			sync := time.Since(lastSync) >= j.syncInterval
			if sync {
				lastSync = time.Now()
			}
			j.flush(sync)
			// A snapshot costs the store's size, so it waits for a journal
			// at least as big as the last snapshot: the rewriting stays a
			// constant share of the updates however many clients there are.
			if snapDone == nil && j.compactBytes > 0 && j.journalSize() > max(j.compactBytes, j.snapSize.Load()) {
				snapDone = make(chan struct{})
				go func(done chan struct{}) {
					defer close(done)
					j.snapshot(s)
				}(snapDone)
			}
		}
	}
}

func (j *journal) journalSize() int64 {
	j.fmu.Lock()
	defer j.fmu.Unlock()
	return j.size
}

const maxSpare = 16 << 20

// flush writes the buffered records; write errors are logged at a bounded
// rate and the records kept for the next try.
func (j *journal) flush(sync bool) {
	j.fmu.Lock()
	defer j.fmu.Unlock()
	j.flushLocked(sync)
}

// flushLocked is flush with fmu held.
func (j *journal) flushLocked(sync bool) {
	j.mu.Lock()
	buf := j.buf
	j.buf, j.spare = j.spare[:0], nil
	j.mu.Unlock()
	if len(buf) > 0 {
		n, err := j.f.Write(buf)
		j.size += int64(n)
		if err != nil {
			if time.Since(j.lastErr) > 10*time.Second {
				j.lastErr = time.Now()
				j.log.Error("state journal write failed; retrying", "err", err)
			}
			j.mu.Lock()
			j.buf = append(buf[n:], j.buf...)
			j.mu.Unlock()
			return
		}
	}
	// A burst's big buffer is not kept for ever.
	if cap(buf) <= maxSpare {
		j.mu.Lock()
		j.spare = buf[:0]
		j.mu.Unlock()
	}
	if sync {
		if err := j.f.Sync(); err != nil && time.Since(j.lastErr) > 10*time.Second {
			j.lastErr = time.Now()
			j.log.Error("state journal fsync failed", "err", err)
		}
	}
}

// snapshot writes every live key to a new snapshot covering the journal
// generations up to the current one, then removes those journals.
func (j *journal) snapshot(s *Store) {
	// The last flush into the generation the snapshot will cover, its
	// fsync and the rotation are one step: a flush by the run loop in
	// between would leave records in that generation that nothing fsyncs
	// before the snapshot is done.
	j.fmu.Lock()
	j.flushLocked(true)
	covered := j.gen
	j.f.Close()
	j.gen++
	if err := j.openGen(); err != nil {
		j.log.Error("state journal rotation failed", "err", err)
	}
	j.fmu.Unlock()
	if err := j.writeSnapshot(s, covered); err != nil {
		j.log.Error("state snapshot failed; the journals are kept", "err", err)
		return
	}
	for _, g := range j.journalGens() {
		if g <= covered {
			os.Remove(filepath.Join(j.dir, "journal."+strconv.FormatUint(g, 10)))
		}
	}
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
		})
		sh.mu.Unlock()
	}
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
	j.snapshot(s)
	j.fmu.Lock()
	j.f.Close()
	j.fmu.Unlock()
	j.lock.Close()
}
