package memory

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/policyd-mail/policyd/store"
)

// Recovery reads what the state directory holds, and loses no more than
// what is damaged. A frame is checked by its length and CRC-32C; a frame
// that fails is damage, and reading goes on at the next offset where a
// valid frame starts (a false start passes a 32-bit checksum once in four
// billion tries), so one bad byte costs the record it is in, not the rest
// of the file.
//
// A snapshot ends with a trailer record giving how many records it holds,
// so the loss is counted exactly; a snapshot without one (written before
// the trailer existed, or cut short) gives an estimate from the damaged
// bytes. A damaged file is kept aside, as NAME.damaged.TIME, before
// anything can replace or remove it: the next snapshot would otherwise
// overwrite the only copy of what could not be read.

const (
	snapshotTrailer = "policyd-snapshot-end"
	// headerPrefix begins both the header and the trailer payloads.
	headerPrefix = "policyd-snapshot-"
)

// errMalformed marks a record whose frame is intact but whose payload
// does not decode: damage, not a reason to stop.
var errMalformed = errors.New("malformed record")

// LoadReport is what Open found in the state directory.
type LoadReport struct {
	SnapshotRecords int // put records read from the snapshot
	JournalRecords  int // records replayed from the journals
	Migrated        int // records whose key was of an earlier shape (store.MigrateKey)
	// Lost is how many records could not be read: exact when LostExact,
	// otherwise an estimate from the damaged bytes (-1: no estimate,
	// everything the file held may be gone).
	Lost         int
	LostExact    bool
	DamagedBytes int64
	// Kept lists the damaged files kept aside, as names in the directory.
	Kept []string
	// Problems are the damage found, one line each, for the log and /readyz.
	Problems []string
}

// Damaged reports whether anything in the directory could not be read.
func (r LoadReport) Damaged() bool { return len(r.Problems) > 0 }

// LossLimit is --state-max-loss: the most records start-up may lose to
// damage before it refuses, as a count or as a share of the snapshot.
// The zero value never refuses: a damaged state directory must not keep
// mail from flowing unless the admin asked for that.
type LossLimit struct {
	percent bool
	set     bool
	n       float64
}

// ParseLossLimit reads "N" (records) or "P%" (of the snapshot's records);
// "" is no limit.
func ParseLossLimit(s string) (LossLimit, error) {
	if s == "" {
		return LossLimit{}, nil
	}
	if p, ok := strings.CutSuffix(s, "%"); ok {
		f, err := strconv.ParseFloat(p, 64)
		if err != nil || !(f >= 0 && f <= 100) {
			return LossLimit{}, fmt.Errorf("%q is not a percentage from 0%% to 100%%", s)
		}
		return LossLimit{percent: true, set: true, n: f}, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 {
		return LossLimit{}, fmt.Errorf("%q is not a record count (N) or a share of the snapshot (P%%)", s)
	}
	return LossLimit{set: true, n: float64(n)}, nil
}

func (l LossLimit) String() string {
	switch {
	case !l.set:
		return ""
	case l.percent:
		return strconv.FormatFloat(l.n, 'f', -1, 64) + "%"
	}
	return strconv.FormatFloat(l.n, 'f', -1, 64)
}

// exceeded says why r's loss is over l, or "".
func (l LossLimit) exceeded(r LoadReport) string {
	switch {
	case !l.set || !r.Damaged():
		return ""
	case r.Lost < 0:
		return "an unknown number of records lost"
	case !l.percent && float64(r.Lost) > l.n:
		return lostText(r)
	case l.percent:
		total := r.SnapshotRecords + r.Lost
		if total > 0 && float64(r.Lost)*100/float64(total) > l.n {
			return fmt.Sprintf("%s of %d in the snapshot", lostText(r), total)
		}
	}
	return ""
}

// scanReport is what one file's scan found.
type scanReport struct {
	records      int   // frames handed to fn without error
	goodBytes    int64 // bytes of those frames
	damagedBytes int64
	regions      int    // separate damaged stretches
	first        string // the first problem, for the log
	// tornTail: the only damage is a record cut short at the end of the
	// file, as a crash in the middle of a write leaves.
	tornTail bool
	// toEnd: the last damage runs to the end of the file, so whatever
	// followed it (in a snapshot, the trailer) is gone.
	toEnd bool
}

func (r *scanReport) damage(off, n int64, why string) {
	if r.first == "" {
		r.first = fmt.Sprintf("offset %d: %s", off, why)
	}
	r.damagedBytes += n
	r.regions++
}

// frameReader reads frames of a file through a window, so a scan costs
// one read per window, not one per frame.
type frameReader struct {
	r      io.ReaderAt
	size   int64
	win    []byte
	winOff int64
}

const (
	frameWindow = 1 << 20
	resyncMin   = 1 << 20
)

// bytes returns the file's bytes [off, off+n), which must lie inside it.
func (fr *frameReader) bytes(off int64, n int) ([]byte, error) {
	if off >= fr.winOff && off+int64(n) <= fr.winOff+int64(len(fr.win)) {
		return fr.win[off-fr.winOff : off-fr.winOff+int64(n)], nil
	}
	size := int(min(int64(max(n, frameWindow)), fr.size-off))
	if cap(fr.win) < size {
		fr.win = make([]byte, size)
	}
	fr.win = fr.win[:size]
	got, err := fr.r.ReadAt(fr.win, off)
	fr.win, fr.winOff = fr.win[:got], off
	if got < n {
		if err == nil || errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF // the file shrank under us
		}
		return nil, err
	}
	return fr.win[:n], nil
}

// frame checks the frame at off and returns its payload, or why it is
// not one. A returned payload is only valid until the next call.
func (fr *frameReader) frame(off int64) ([]byte, string, error) {
	if fr.size-off < 8 {
		return nil, "torn header", nil
	}
	hdr, err := fr.bytes(off, 8)
	if err != nil {
		return nil, "", err
	}
	l := binary.LittleEndian.Uint32(hdr[:4])
	sum := binary.LittleEndian.Uint32(hdr[4:])
	if l > maxRecord {
		return nil, fmt.Sprintf("length %d is corrupt", l), nil
	}
	if fr.size-off-8 < int64(l) {
		return nil, fmt.Sprintf("torn (%d bytes announced)", l), nil
	}
	p, err := fr.bytes(off+8, int(l))
	if err != nil {
		return nil, "", err
	}
	if crc32.Checksum(p, crcTable) != sum {
		return nil, "checksum mismatch", nil
	}
	return p, "", nil
}

// resync returns the first offset at or after from where a frame whose
// payload could be a record starts, or the file's size. maxLen bounds a
// candidate's length: the checksum of every plausible offset is what a
// resynchronisation costs.
func (fr *frameReader) resync(from int64, maxLen uint32) (int64, error) {
	for off := from; fr.size-off >= 9; off++ {
		// Cheap tests first, on the window: a plausible length and a
		// payload that starts as a record does.
		w, err := fr.bytes(off, 9)
		if err != nil {
			return 0, err
		}
		l := binary.LittleEndian.Uint32(w[:4])
		if l == 0 || l > maxLen || fr.size-off-8 < int64(l) {
			continue
		}
		if ok, err := fr.plausible(off+8, l); err != nil || !ok {
			if err != nil {
				return 0, err
			}
			continue
		}
		p, _, err := fr.frame(off)
		if err != nil {
			return 0, err
		}
		if p != nil {
			return off, nil
		}
	}
	return fr.size, nil
}

// plausible checks the start of an l-byte payload at off for the shape
// of a record, before a checksum over all of it is worth computing.
func (fr *frameReader) plausible(off int64, l uint32) (bool, error) {
	p, err := fr.bytes(off, int(min(l, 32)))
	if err != nil {
		return false, err
	}
	switch p[0] {
	case headerPrefix[0]:
		return len(p) >= len(headerPrefix) && string(p[:len(headerPrefix)]) == headerPrefix, nil
	case opDel:
		klen, m := binary.Uvarint(p[1:])
		return m > 0 && uint64(l) == 1+uint64(m)+klen, nil
	case opPut:
		klen, m := binary.Uvarint(p[1:])
		at := 1 + uint64(m) + klen // the kind byte
		if m <= 0 || at >= uint64(l) {
			return false, nil
		}
		k, err := fr.bytes(off+int64(at), 1)
		if err != nil {
			return false, err
		}
		return kind(k[0]) <= kindLeases, nil
	}
	return false, nil
}

// scanRecords calls fn for every intact record of r, skipping damage. An
// fn error wrapping errMalformed is damage too; any other fn error stops
// the scan and is returned.
func scanRecords(r io.ReaderAt, size int64, fn func(payload []byte) error) (scanReport, error) {
	var rep scanReport
	fr := &frameReader{r: r, size: size}
	// Candidates past damage may be as long as twice the longest record
	// seen, and at least resyncMin: a legitimate record longer than that
	// right after damage is lost with it, a fair price for a scan of
	// garbage that ends.
	longest := uint32(0)
	for off := int64(0); off < size; {
		p, why, err := fr.frame(off)
		if err != nil {
			return rep, err
		}
		if p != nil {
			n := int64(8 + len(p))
			err := fn(p)
			if err == nil {
				rep.records++
				rep.goodBytes += n
				off += n
				longest = max(longest, uint32(len(p)))
				continue
			}
			if !errors.Is(err, errMalformed) {
				return rep, err
			}
			why = err.Error()
		}
		next, err := fr.resync(off+1, min(max(resyncMin, 2*longest), maxRecord))
		if err != nil {
			return rep, err
		}
		rep.tornTail = rep.regions == 0 && next == size && strings.HasPrefix(why, "torn")
		rep.toEnd = next == size
		rep.damage(off, next-off, why)
		off = next
	}
	return rep, nil
}

// scanFile is scanRecords over the file at name; an empty file has no
// records and no damage (the caller knows what an empty file means).
func scanFile(name string, fn func(payload []byte) error) (scanReport, int64, error) {
	f, err := os.Open(name)
	if err != nil {
		return scanReport{}, 0, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return scanReport{}, 0, err
	}
	sr, err := scanRecords(f, fi.Size(), fn)
	return sr, fi.Size(), err
}

// readRecords is scanRecords over a whole file, for tests and tools.
func readRecords(f *os.File, fn func(payload []byte) error) error {
	fi, err := f.Stat()
	if err != nil {
		return err
	}
	_, err = scanRecords(f, fi.Size(), fn)
	return err
}

// keepDamaged keeps name aside as name.damaged.TIME, by a hard link
// (instant, no space) or else a copy, and returns the new base name.
func keepDamaged(name string, now time.Time) (string, error) {
	kept := name + ".damaged." + now.UTC().Format("20060102T150405.000Z")
	if err := os.Link(name, kept); err == nil {
		syncDir(filepath.Dir(name))
		return filepath.Base(kept), nil
	}
	in, err := os.Open(name)
	if err != nil {
		return "", err
	}
	defer in.Close()
	out, err := os.OpenFile(kept, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if err != nil {
		return "", err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		os.Remove(kept)
		return "", err
	}
	if err := out.Sync(); err != nil {
		out.Close()
		os.Remove(kept)
		return "", err
	}
	if err := out.Close(); err != nil {
		return "", err
	}
	syncDir(filepath.Dir(name))
	return filepath.Base(kept), nil
}

// snapshotMeta is what the header and the trailer say.
type snapshotMeta struct {
	covered           uint64
	haveCovered       bool
	count             int // records the trailer announces
	haveCount, header bool
	version           int // 2 ends with a trailer; 1 (before it) may not
}

// parse reads a header or trailer payload into m.
func (m *snapshotMeta) parse(p []byte) error {
	f := strings.Fields(string(p))
	switch {
	case len(f) == 2 && (f[0] == snapshotMagic || f[0] == snapshotMagic1):
		g, err := strconv.ParseUint(f[1], 10, 64)
		if err != nil {
			break
		}
		m.covered, m.haveCovered, m.header = g, true, true
		m.version = 1
		if f[0] == snapshotMagic {
			m.version = 2
		}
		return nil
	case len(f) == 3 && f[0] == snapshotTrailer:
		g, err1 := strconv.ParseUint(f[1], 10, 64)
		n, err2 := strconv.Atoi(f[2])
		if err1 != nil || err2 != nil || n < 0 {
			break
		}
		m.covered, m.haveCovered = g, true
		m.count, m.haveCount = n, true
		return nil
	}
	return fmt.Errorf("%w: not a policyd snapshot header", errMalformed)
}

// recover loads the snapshot and replays newer journals into s. It
// returns the highest generation seen and what it found. Damage is
// reported and skipped; the errors are running out of memory, which must
// stop start-up rather than be taken for damage (the next snapshot would
// then drop the records not loaded), and a loss over opts' limit.
func (j *journal) recover(s *Store, limit LossLimit) (uint64, LoadReport, error) {
	start := time.Now()
	now := s.nowNanos()
	var rep LoadReport
	var fatal error
	apply := func(payload []byte) error {
		op, key, e, err := decodeRecord(payload)
		if err != nil {
			return err
		}
		// A state directory of an earlier version: its keys of an
		// earlier shape take the grammar's (store/key.go).
		if k, ok := store.MigrateKey(key); ok {
			key = k
			rep.Migrated++
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
	keep := func(name string) {
		kept, err := keepDamaged(name, start)
		if err != nil {
			j.log.Error("could not keep the damaged state file aside", "file", name, "err", err)
			return
		}
		rep.Kept = append(rep.Kept, kept)
	}

	var meta snapshotMeta
	snapName := filepath.Join(j.dir, "snapshot")
	sr, size, err := scanFile(snapName, func(p []byte) error {
		if len(p) > 0 && p[0] == headerPrefix[0] {
			return meta.parse(p)
		}
		if err := apply(p); err != nil {
			return err
		}
		rep.SnapshotRecords++
		return nil
	})
	snapFound := !errors.Is(err, os.ErrNotExist)
	switch {
	case fatal != nil:
		return 0, rep, fatal
	case !snapFound:
	case err != nil:
		// Unreadable but present (permissions, I/O): nothing can be done
		// here, and a new snapshot would replace it.
		return 0, rep, fmt.Errorf("state snapshot unreadable: %w", err)
	default:
		j.snapSize.Store(size)
		if size == 0 {
			sr.damage(0, 0, "the file is empty")
		}
		switch {
		case !meta.header && sr.regions == 0:
			// Intact frames without a header: another program's file.
			sr.damage(0, 0, "no snapshot header")
		case meta.version >= 2 && !meta.haveCount && sr.regions == 0:
			// Cut exactly at a record's end: only the trailer tells.
			sr.damage(size, 0, "no trailer: the file was cut short")
			sr.toEnd = true
		}
		if sr.regions > 0 {
			rep.DamagedBytes += sr.damagedBytes
			switch {
			case meta.haveCount:
				rep.Lost, rep.LostExact = max(meta.count-rep.SnapshotRecords, 0), true
			case rep.SnapshotRecords > 0 && sr.damagedBytes > 0 && !sr.toEnd:
				// An estimate: the damaged bytes at the size of an average record.
				avg := float64(sr.goodBytes) / float64(sr.records)
				rep.Lost = int(math.Ceil(float64(sr.damagedBytes) / avg))
			default:
				rep.Lost = -1
			}
			rep.Problems = append(rep.Problems, fmt.Sprintf("snapshot damaged at %s (%d bytes unreadable in %s): %s", sr.first, sr.damagedBytes, places(sr.regions), lostText(rep)))
			keep(snapName)
		}
	}

	gens := j.journalGens()
	if !snapFound && len(gens) > 0 && gens[0] > 1 {
		// Journals are only removed once a snapshot covers them: their
		// records were in a snapshot that is gone.
		rep.Lost = -1
		rep.Problems = append(rep.Problems, fmt.Sprintf("snapshot missing: the journals start at generation %d, so what only it held is lost", gens[0]))
	}
	maxGen := meta.covered
	for _, g := range gens {
		maxGen = max(maxGen, g)
		if meta.haveCovered && g <= meta.covered {
			continue
		}
		name := filepath.Join(j.dir, "journal."+strconv.FormatUint(g, 10))
		sr, _, err := scanFile(name, func(p []byte) error {
			if err := apply(p); err != nil {
				return err
			}
			rep.JournalRecords++
			return nil
		})
		if fatal != nil {
			return 0, rep, fatal
		}
		if err != nil {
			// As for the snapshot: skipped, it would be removed by the
			// next snapshot with everything it holds.
			return 0, rep, fmt.Errorf("state journal %s unreadable: %w", name, err)
		}
		if sr.regions == 0 {
			continue
		}
		if sr.tornTail {
			// What a crash during a write leaves: the record being
			// written, never acknowledged as persisted.
			j.log.Warn("state journal damaged: its last record was cut short, as a crash in a write leaves it; kept what came before", "file", name, "at", sr.first)
			continue
		}
		rep.DamagedBytes += sr.damagedBytes
		if rep.Lost >= 0 {
			rep.LostExact = false
			if sr.records > 0 {
				rep.Lost += int(math.Ceil(float64(sr.damagedBytes) / (float64(sr.goodBytes) / float64(sr.records))))
			} else {
				rep.Lost = -1
			}
		}
		rep.Problems = append(rep.Problems, fmt.Sprintf("journal.%d damaged at %s (%d bytes unreadable in %s)", g, sr.first, sr.damagedBytes, places(sr.regions)))
		keep(name)
	}
	if rep.Damaged() {
		j.log.Error("state directory damaged; started from every record that could be read",
			"dir", j.dir, "problems", strings.Join(rep.Problems, "; "), "records_lost", lostText(rep), "kept", strings.Join(rep.Kept, " "))
	}
	j.log.Info("state loaded", "dir", j.dir, "keys", s.Len(), "snapshot_records", rep.SnapshotRecords, "journal_records", rep.JournalRecords, "migrated_keys", rep.Migrated, "took", time.Since(start).Round(time.Millisecond))
	if why := limit.exceeded(rep); why != "" {
		// Nothing was changed, so the copies kept aside are not needed:
		// a restart loop must not fill the directory with them.
		for _, k := range rep.Kept {
			os.Remove(filepath.Join(j.dir, k))
		}
		rep.Kept = nil
		return 0, rep, fmt.Errorf("state directory %s damaged: %s, over --state-max-loss %s; it is left as it was: start with a higher --state-max-loss (or none) to run with every record that can be read, or restore the directory from a backup",
			j.dir, why, limit)
	}
	return maxGen, rep, nil
}

// lostText says how many records r lost, in words.
func lostText(r LoadReport) string {
	switch {
	case r.Lost < 0:
		return "an unknown number of records lost"
	case r.LostExact && r.Lost == 1:
		return "1 record lost"
	case r.LostExact:
		return fmt.Sprintf("%d records lost", r.Lost)
	}
	return fmt.Sprintf("about %d records lost", r.Lost)
}

// LoadReport is what Open found in the state directory: the records read
// and what damage cost. Zero for a Store without a directory.
func (s *Store) LoadReport() LoadReport { return s.loadReport }

func places(n int) string {
	if n == 1 {
		return "1 place"
	}
	return strconv.Itoa(n) + " places"
}
