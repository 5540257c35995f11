package memory

import (
	"bytes"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/store"
)

// snapshotDir returns a state directory whose snapshot holds n counters,
// written by a clean Close, and the snapshot's bytes.
func snapshotDir(t *testing.T, n int) (string, []byte) {
	t.Helper()
	dir := t.TempDir()
	s := openT(t, Options{Dir: dir, SweepInterval: -1, CompactBytes: -1})
	for i := range n {
		if _, err := s.Incr(t.Context(), counterKey(i), int64(i+1), 0); err != nil {
			t.Fatal(err)
		}
	}
	s.Close()
	b, err := os.ReadFile(filepath.Join(dir, "snapshot"))
	if err != nil {
		t.Fatal(err)
	}
	return dir, b
}

func counterKey(i int) string {
	return store.Key("10.0."+strconv.Itoa(i/256)+"."+strconv.Itoa(i%256)+"/32", "client_stats", "n")
}

// reopen opens dir again and returns the store, its log and how many of
// the first n counters came back with their value.
func reopen(t *testing.T, dir string, n int, opts Options) (*Store, string, int) {
	t.Helper()
	var logs bytes.Buffer
	opts.Dir, opts.SweepInterval = dir, -1
	opts.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	s, err := Open(opts)
	if err != nil {
		t.Fatalf("Open: %v\n%s", err, logs.String())
	}
	t.Cleanup(func() { s.Close() })
	got := 0
	for i := range n {
		if v, ok, _ := s.Get(t.Context(), counterKey(i)); ok && string(v) == strconv.Itoa(i+1) {
			got++
		}
	}
	return s, logs.String(), got
}

// One flipped byte costs the record it is in: the scan resynchronises on
// the next frame. Before, it ended the load there, and the next snapshot
// replaced the file, so the rest was gone for good.
func TestSnapshotDamageCostsOnlyTheDamagedRecords(t *testing.T) {
	const n = 5000
	tests := []struct {
		name    string
		offsets []int // bytes flipped
		lost    int   // exact loss the trailer allows counting
	}{
		{"one byte at offset 1000", []int{1000}, 1},
		{"three bytes far apart", []int{1000, 40000, 90000}, 3},
		{"a length field", []int{-1}, 1}, // -1: the length of the 100th record
		{"the header", []int{10}, 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir, b := snapshotDir(t, n)
			for _, off := range tc.offsets {
				if off < 0 {
					off = recordOffset(t, b, 100)
				}
				b[off] ^= 0x5a
			}
			snap := filepath.Join(dir, "snapshot")
			if err := os.WriteFile(snap, b, 0o600); err != nil {
				t.Fatal(err)
			}
			s, logs, got := reopen(t, dir, n, Options{})
			if got != n-tc.lost {
				t.Errorf("%d of %d counters back, want %d", got, n, n-tc.lost)
			}
			rep := s.LoadReport()
			if rep.Lost != tc.lost || !rep.LostExact {
				t.Errorf("report: lost %d (exact %v), want %d exact", rep.Lost, rep.LostExact, tc.lost)
			}
			if want := lostText(LoadReport{Lost: tc.lost, LostExact: true}); !strings.Contains(logs, want) {
				t.Errorf("log lacks %q:\n%s", want, logs)
			}
			if len(rep.Kept) != 1 || !strings.HasPrefix(rep.Kept[0], "snapshot.damaged.") {
				t.Fatalf("kept %q, want one snapshot.damaged.*", rep.Kept)
			}
			// The next snapshot (here at Close) must not be the end of
			// the damaged file: it stays as it was, beside the new one.
			s.Close()
			kept, err := os.ReadFile(filepath.Join(dir, rep.Kept[0]))
			if err != nil || !bytes.Equal(kept, b) {
				t.Fatalf("damaged snapshot not kept intact after the next snapshot (err %v, %d bytes, want %d)", err, len(kept), len(b))
			}
			_, logs, got = reopen(t, dir, n, Options{})
			if got != n-tc.lost || strings.Contains(logs, "damaged") {
				t.Errorf("after the new snapshot: %d counters back, want %d, and no damage:\n%s", got, n-tc.lost, logs)
			}
		})
	}
}

// countFrames counts the whole frames of b.
func countFrames(b []byte) int {
	n := 0
	for off := 0; off+8 <= len(b); n++ {
		off += 8 + int(uint32(b[off])|uint32(b[off+1])<<8|uint32(b[off+2])<<16|uint32(b[off+3])<<24)
		if off > len(b) {
			break
		}
	}
	return n
}

// recordOffset returns the offset of the i-th frame of a record file.
func recordOffset(t *testing.T, b []byte, i int) int {
	t.Helper()
	off := 0
	for range i {
		if off+8 > len(b) {
			t.Fatalf("fewer than %d frames", i)
		}
		off += 8 + int(uint32(b[off])|uint32(b[off+1])<<8|uint32(b[off+2])<<16|uint32(b[off+3])<<24)
	}
	return off
}

// A snapshot that is empty, cut short or missing is reported, with what
// it cost when that can be told.
func TestSnapshotGoneIsReported(t *testing.T) {
	const n = 2000
	tests := []struct {
		name   string
		damage func(t *testing.T, dir string, b []byte)
		logs   string
		lost   int // -1: unknown
		kept   bool
	}{
		{"zero length", func(t *testing.T, dir string, _ []byte) {
			os.Truncate(filepath.Join(dir, "snapshot"), 0)
		}, "the file is empty", -1, true},
		{"cut in half", func(t *testing.T, dir string, b []byte) {
			// Mid-record ("torn"), or, when the half falls on a record's
			// end (record order follows the per-store hash seed), "no
			// trailer": either way the loss is unknown.
			os.Truncate(filepath.Join(dir, "snapshot"), int64(len(b)/2))
		}, "snapshot damaged at offset", -1, true},
		{"cut at a record's end, before the trailer", func(t *testing.T, dir string, b []byte) {
			off, last := 0, 0
			for off < len(b) {
				last = off
				off = recordOffset(t, b, 1+countFrames(b[:off]))
			}
			os.Truncate(filepath.Join(dir, "snapshot"), int64(last))
		}, "no trailer", -1, true},
		{"removed, journals after it", func(t *testing.T, dir string, _ []byte) {
			os.Remove(filepath.Join(dir, "snapshot"))
		}, "snapshot missing", -1, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir, b := snapshotDir(t, n)
			tc.damage(t, dir, b)
			s, logs, _ := reopen(t, dir, n, Options{})
			rep := s.LoadReport()
			if !rep.Damaged() || !strings.Contains(logs, tc.logs) {
				t.Errorf("damage not reported as %q:\n%s", tc.logs, logs)
			}
			if (tc.lost < 0) != (rep.Lost < 0) || rep.LostExact {
				t.Errorf("report: lost %d (exact %v), want %s", rep.Lost, rep.LostExact, map[bool]string{true: "unknown", false: "an estimate"}[tc.lost < 0])
			}
			if (len(rep.Kept) > 0) != tc.kept {
				t.Errorf("kept %q", rep.Kept)
			}
		})
	}
}

// --state-max-loss refuses to start over its limit, and says what to do.
func TestStateMaxLoss(t *testing.T) {
	const n = 1000
	tests := []struct {
		limit   string
		flipped int
		refuse  bool
	}{
		{"", 3, false},
		{"3", 3, false},
		{"2", 3, true},
		{"0.5%", 3, false},
		{"0.2%", 3, true},
		{"0", 0, false},
	}
	for _, tc := range tests {
		t.Run(tc.limit+"/"+strconv.Itoa(tc.flipped), func(t *testing.T) {
			dir, b := snapshotDir(t, n)
			for i := range tc.flipped {
				b[recordOffset(t, b, 10+100*i)+12] ^= 1
			}
			os.WriteFile(filepath.Join(dir, "snapshot"), b, 0o600)
			limit, err := ParseLossLimit(tc.limit)
			if err != nil {
				t.Fatal(err)
			}
			s, err := Open(Options{Dir: dir, SweepInterval: -1, MaxLoss: limit})
			if s != nil {
				defer s.Close()
			}
			if tc.refuse {
				if err == nil || !strings.Contains(err.Error(), "over --state-max-loss "+tc.limit) {
					t.Fatalf("Open: %v, want a refusal naming the limit", err)
				}
				// The directory is left as it was: no copies pile up in a restart loop.
				if kept, _ := filepath.Glob(filepath.Join(dir, "*.damaged.*")); len(kept) > 0 {
					t.Errorf("a refused start left %q", kept)
				}
				// Refusing must leave the directory usable by the next try.
				s, err := Open(Options{Dir: dir, SweepInterval: -1})
				if err != nil {
					t.Fatalf("Open after a refusal: %v", err)
				}
				s.Close()
				return
			}
			if err != nil {
				t.Fatalf("Open: %v", err)
			}
		})
	}
}

func TestParseLossLimit(t *testing.T) {
	for _, tc := range []struct {
		in, out string
		ok      bool
	}{
		{"", "", true}, {"0", "0", true}, {"100", "100", true}, {"5%", "5%", true}, {"0.5%", "0.5%", true},
		{"-1", "", false}, {"101%", "", false}, {"x", "", false}, {"NaN%", "", false}, {"1e3", "", false},
	} {
		l, err := ParseLossLimit(tc.in)
		if (err == nil) != tc.ok || tc.ok && l.String() != tc.out {
			t.Errorf("ParseLossLimit(%q) = %q, %v", tc.in, l, err)
		}
	}
}

// A scan through random damage never panics and never reports more good
// records than were written.
func FuzzScanRecords(f *testing.F) {
	var file []byte
	for i := range 20 {
		file = appendRecord(file, encodeEntry(nil, counterKey(i), entry{kind: kindInt, n: int64(i)}))
	}
	f.Add(file, 0, byte(0))
	f.Add(file, 37, byte(0xff))
	f.Fuzz(func(t *testing.T, b []byte, off int, x byte) {
		if off >= 0 && off < len(b) {
			b = append([]byte(nil), b...)
			b[off] ^= x
		}
		rep, err := scanRecords(bytes.NewReader(b), int64(len(b)), func(p []byte) error {
			_, _, _, err := decodeRecord(p)
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
		if rep.goodBytes+rep.damagedBytes != int64(len(b)) {
			t.Fatalf("good %d + damaged %d bytes != %d", rep.goodBytes, rep.damagedBytes, len(b))
		}
	})
}

// A state directory written before @NET: client_stats' records come
// back under the grammar's keys, with their counts, and the admin API
// finds them.
func TestLoadMigratesEarlierKeys(t *testing.T) {
	dir := t.TempDir()
	s := openT(t, Options{Dir: dir, SweepInterval: -1, CompactBytes: -1})
	old := store.Key("192.0.0.0/8", "client_stats", "192.0.2.0/24")
	oldInst := store.Key("2001:db8::/32", "client_stats:1", "2001:db8:1::/48")
	shaper := store.Key("192.0.2.7", "connection_shaper", "sessions")
	ctx := t.Context()
	s.HIncr(ctx, 0, store.FieldIncr{Key: old, Field: "success", Delta: 3})
	s.HIncr(ctx, 0, store.FieldIncr{Key: oldInst, Field: "permfail", Delta: 2})
	s.Incr(ctx, shaper, 5, 0)
	s.j.flush(true)
	crash(s) // the journal holds them: no snapshot rewrote anything
	s2, logs, _ := reopen(t, dir, 0, Options{})
	if got := s2.LoadReport().Migrated; got != 2 {
		t.Errorf("%d keys migrated, want 2\n%s", got, logs)
	}
	for k, want := range map[string]map[string]int64{
		"policyd:{192.0.0.0/8}:client_stats:@192.0.2.0/24":        {"success": 3},
		"policyd:{2001:db8::/32}:client_stats:1:@2001:db8:1::/48": {"permfail": 2},
	} {
		recs, err := s2.HGet(ctx, k)
		if err != nil || recs[0]["success"] != want["success"] || recs[0]["permfail"] != want["permfail"] {
			t.Errorf("%s = %v, %v; want %v", k, recs, err, want)
		}
	}
	if v, _, _ := s2.Get(ctx, shaper); string(v) != "5" {
		t.Errorf("%s = %q, want 5", shaper, v)
	}
	found, err := store.FindClient(ctx, s2, netip.MustParsePrefix("192.0.2.7/32"))
	if err != nil || len(found) != 2 {
		t.Errorf("FindClient after migration: %v, %v; want the shaper and the /24 record", found, err)
	}
}

// A snapshot clears what a drop owed only if the drop came before its
// rotation: a drop during the snapshot leaves a hole in the journal it
// does not cover, and a crash would replay an older value over it.
func TestDropDuringSnapshotStaysOwed(t *testing.T) {
	dir := t.TempDir()
	s := openT(t, Options{Dir: dir, SweepInterval: -1, CompactBytes: -1, FlushInterval: time.Hour, MaxJournalBuffer: 1})
	ctx := t.Context()
	s.Set(ctx, "k", []byte("v0"), 0)
	hook := func() {
		// Rotated, not yet scanned: v1 reaches the new journal, then the
		// disk fails and v2 is dropped.
		s.Set(ctx, "k", []byte("v1"), 0)
		s.j.flush(false)
		s.j.mu.Lock()
		s.j.health.failing, s.j.health.lastErr = true, "journal write: no space left on device"
		s.j.mu.Unlock()
		s.Set(ctx, "k", []byte("v2"), 0)
	}
	snapshotPause.Store(&hook)
	err := s.j.snapshot(s)
	snapshotPause.Store(nil)
	if err != nil {
		t.Fatal(err)
	}
	s.j.flush(true) // the disk takes writes again
	if p := s.Persistence(); p.Behind == "" {
		t.Fatalf("after a snapshot that does not cover the drop: %+v, want still behind", p)
	}
	if err := s.j.snapshot(s); err != nil {
		t.Fatal(err)
	}
	if p := s.Persistence(); p.Behind != "" {
		t.Fatalf("after the owed snapshot: %+v", p)
	}
	crash(s)
	s2 := openT(t, Options{Dir: dir, SweepInterval: -1})
	defer s2.Close()
	if v, _, _ := s2.Get(ctx, "k"); string(v) != "v2" {
		t.Errorf("after a crash k = %q, want v2", v)
	}
}

// A journal that cannot be read stops start-up: skipped, it would be
// removed by the next snapshot with all it holds.
func TestUnreadableJournalRefusesStart(t *testing.T) {
	dir, _ := snapshotDir(t, 10)
	if err := os.Mkdir(filepath.Join(dir, "journal.99"), 0o700); err != nil {
		t.Fatal(err)
	}
	if s, err := Open(Options{Dir: dir, SweepInterval: -1}); err == nil || !strings.Contains(err.Error(), "journal.99 unreadable") {
		if s != nil {
			s.Close()
		}
		t.Fatalf("Open with an unreadable journal: %v", err)
	}
}

// Garbage shaped like frame headers (a length, then a payload starting
// with a record's op byte) is rejected by its shape, before a checksum
// over megabytes is computed for every offset; before, a megabyte of it
// took minutes to scan.
func TestResyncRejectsImplausibleFrames(t *testing.T) {
	b := bytes.Repeat([]byte{opPut, 0x00, 0x80, 0x00}, (256<<10)/4)
	b = append(b, make([]byte, 8<<20)...) // room for the lengths it announces
	fr := &frameReader{r: bytes.NewReader(b), size: int64(len(b))}
	if ok, err := fr.plausible(8, 0x00800050); ok || err != nil {
		t.Fatalf("plausible = %v, %v on the pattern", ok, err)
	}
	rep, err := scanRecords(bytes.NewReader(b), int64(len(b)), func(p []byte) error {
		_, _, _, err := decodeRecord(p)
		return err
	})
	if err != nil || rep.records != 0 || rep.damagedBytes != int64(len(b)) {
		t.Fatalf("scan: %+v, %v", rep, err)
	}
}
