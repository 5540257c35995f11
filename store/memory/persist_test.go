package memory

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/store"
	"github.com/policyd-mail/policyd/store/storetest"
)

func openT(t *testing.T, opts Options) *Store {
	t.Helper()
	s, err := Open(opts)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// The persisted store keeps the whole contract.
func TestPersistedContract(t *testing.T) {
	clock := newFakeClock()
	storetest.Run(t, storetest.Harness{
		New: func(t *testing.T) store.Store {
			return openT(t, Options{Dir: t.TempDir(), Now: clock.Now, SweepInterval: -1, CompactBytes: 4096})
		},
		Advance: func(_ *testing.T, d time.Duration) { clock.Advance(d) },
	})
}

// Everything a rule stores comes back after a clean restart, expiries
// included; what expired meanwhile does not.
func TestPersistRestart(t *testing.T) {
	dir := t.TempDir()
	clock := newFakeClock()
	ctx := context.Background()
	t0 := time.Unix(1_790_000_000, 0)
	s := openT(t, Options{Dir: dir, Now: clock.Now, SweepInterval: -1})
	s.Incr(ctx, "policyd:{a}:r:count", 5, time.Hour)
	s.Set(ctx, "policyd:{a}:r:str", []byte("x\x00y"), 0)
	s.Set(ctx, "policyd:{a}:r:short", []byte("gone"), time.Minute)
	s.HIncr(ctx, time.Hour, store.FieldIncr{Key: "policyd:{a}:r:h1", Field: "s", Delta: 3}, store.FieldIncr{Key: "policyd:{a}:r:h2", Field: "p", Delta: -2})
	s.Tally(ctx, "policyd:{a}:r:tally", t0, time.Hour, time.Hour)
	s.Acquire(ctx, "policyd:{a}:r:slots", "m1", 2, t0, time.Hour)
	s.Set(ctx, "policyd:{a}:r:deleted", []byte("d"), 0)
	s.Delete(ctx, "policyd:{a}:r:deleted")
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	clock.Advance(2 * time.Minute)
	s2 := openT(t, Options{Dir: dir, Now: clock.Now, SweepInterval: -1})
	defer s2.Close()
	if n, _ := s2.Incr(ctx, "policyd:{a}:r:count", 1, time.Hour); n != 6 {
		t.Errorf("counter after restart: %d, want 6", n)
	}
	if e, ok, _ := s2.Inspect(ctx, "policyd:{a}:r:count"); !ok || e.TTL <= 57*time.Minute || e.TTL > 58*time.Minute {
		t.Errorf("counter expiry after restart: %+v (want ~58m left)", e)
	}
	if v, ok, _ := s2.Get(ctx, "policyd:{a}:r:str"); !ok || string(v) != "x\x00y" {
		t.Errorf("string after restart: %q %v", v, ok)
	}
	if _, ok, _ := s2.Get(ctx, "policyd:{a}:r:short"); ok {
		t.Error("a key that expired while stopped came back")
	}
	if _, ok, _ := s2.Get(ctx, "policyd:{a}:r:deleted"); ok {
		t.Error("a deleted key came back")
	}
	h, _ := s2.HGet(ctx, "policyd:{a}:r:h1", "policyd:{a}:r:h2", "policyd:{a}:r:tally")
	if h[0]["s"] != 3 || h[1]["p"] != -2 || h[2][store.TallyCount] != 1 {
		t.Errorf("hashes after restart: %v", h)
	}
	if ok, held, _ := s2.Acquire(ctx, "policyd:{a}:r:slots", "m2", 2, t0, time.Hour); !ok || held != 2 {
		t.Errorf("lease set after restart: %v %d", ok, held)
	}
}

// The journal is compacted into a snapshot as it grows.
func TestPersistCompaction(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	s := openT(t, Options{Dir: dir, SweepInterval: -1, CompactBytes: 2048, FlushInterval: time.Millisecond})
	for i := range 2000 {
		s.Incr(ctx, store.Key("c"+strconv.Itoa(i%50), "r", "n"), 1, time.Hour)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join(dir, "snapshot")); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no snapshot written while the journal grew")
		}
		s.j.flush(false) // nudges nothing the flusher would not do; keeps the loop busy-free of sleeps
	}
	s.Close()
	gens, _ := filepath.Glob(filepath.Join(dir, "journal.*"))
	if len(gens) > 2 {
		t.Errorf("%d journals left after compaction: %v", len(gens), gens)
	}
	s2 := openT(t, Options{Dir: dir, SweepInterval: -1})
	defer s2.Close()
	for i := range 50 {
		if v, _, _ := s2.Get(ctx, store.Key("c"+strconv.Itoa(i), "r", "n")); string(v) != "40" {
			t.Fatalf("client %d after compaction: %q, want 40", i, v)
		}
	}
}

// A damaged state directory is reported and never stops the store from
// opening; what came before the damage is kept.
func TestPersistDamagedFiles(t *testing.T) {
	ctx := context.Background()
	tests := []struct {
		name   string
		damage func(t *testing.T, dir string)
		keep   int // counters (of 10) expected back
		logs   string
	}{
		{"truncated journal", func(t *testing.T, dir string) {
			f := filepath.Join(dir, "journal.1")
			fi, _ := os.Stat(f)
			os.Truncate(f, fi.Size()-3)
		}, 9, "state journal damaged"},
		{"flipped byte in the journal", func(t *testing.T, dir string) {
			f := filepath.Join(dir, "journal.1")
			b, _ := os.ReadFile(f)
			b[len(b)-2] ^= 0xff
			os.WriteFile(f, b, 0o600)
		}, 9, "checksum mismatch"},
		{"garbage snapshot", func(t *testing.T, dir string) {
			os.WriteFile(filepath.Join(dir, "snapshot"), []byte("this is not a snapshot at all"), 0o600)
		}, 10, "snapshot damaged"},
		{"journal of zeros", func(t *testing.T, dir string) {
			os.WriteFile(filepath.Join(dir, "journal.9"), make([]byte, 4096), 0o600)
		}, 10, "journal.9 damaged"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			s := openT(t, Options{Dir: dir, SweepInterval: -1, CompactBytes: -1})
			for i := range 10 {
				s.Incr(ctx, store.Key(strconv.Itoa(i), "r", "n"), 1, 0)
			}
			s.j.flush(true)
			// Crash: no Close, so no snapshot; just let go of the lock.
			crash(s)
			tc.damage(t, dir)
			var logs bytes.Buffer
			s2, err := Open(Options{Dir: dir, SweepInterval: -1, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
			if err != nil {
				t.Fatalf("Open after damage: %v", err)
			}
			defer s2.Close()
			got := 0
			for i := range 10 {
				if _, ok, _ := s2.Get(ctx, store.Key(strconv.Itoa(i), "r", "n")); ok {
					got++
				}
			}
			if got != tc.keep {
				t.Errorf("%d counters back, want %d", got, tc.keep)
			}
			if !strings.Contains(logs.String(), tc.logs) {
				t.Errorf("log lacks %q:\n%s", tc.logs, logs.String())
			}
		})
	}
}

// crash stops a store's goroutines without the clean-shutdown snapshot,
// as a killed process would, and frees its directory lock.
func crash(s *Store) {
	close(s.j.stop)
	<-s.j.done
	s.j.f.Close()
	s.j.lock.Close()
	if s.stop != nil {
		close(s.stop)
		<-s.done
	}
}

func TestPersistDirectoryLocked(t *testing.T) {
	dir := t.TempDir()
	s := openT(t, Options{Dir: dir})
	defer s.Close()
	if _, err := Open(Options{Dir: dir}); err == nil || !strings.Contains(err.Error(), "in use by another policyd") {
		t.Fatalf("second Open of one directory: %v", err)
	}
}

// A real kill -9: a child process increments a counter as fast as it can
// and reports what it has done; after the kill, the counter read back
// holds at least what was acknowledged one flush interval before it.
func TestPersistSurvivesKill9(t *testing.T) {
	if os.Getenv("POLICYD_KILL9_CHILD") != "" {
		kill9Child(os.Getenv("POLICYD_KILL9_CHILD"))
		return
	}
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestPersistSurvivesKill9$")
	cmd.Env = append(os.Environ(), "POLICYD_KILL9_CHILD="+dir)
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	type ack struct {
		n  int64
		at time.Time
	}
	var acks []ack
	for sc.Scan() {
		var n int64
		if _, err := fmt.Sscanf(sc.Text(), "acked %d", &n); err == nil {
			acks = append(acks, ack{n, time.Now()})
		}
		if len(acks) >= 30 {
			break
		}
	}
	killedAt := time.Now()
	cmd.Process.Signal(syscall.SIGKILL)
	cmd.Wait()
	if len(acks) < 30 {
		t.Fatalf("child reported %d acks", len(acks))
	}
	// What was acknowledged a safe margin before the kill must be there.
	var mustHave int64
	for _, a := range acks {
		if killedAt.Sub(a.at) > 600*time.Millisecond {
			mustHave = a.n
		}
	}
	s, err := Open(Options{Dir: dir, SweepInterval: -1})
	if err != nil {
		t.Fatalf("open after kill -9: %v", err)
	}
	defer s.Close()
	v, _, _ := s.Get(context.Background(), store.Key("c", "r", "n"))
	got, _ := strconv.ParseInt(string(v), 10, 64)
	last := acks[len(acks)-1].n
	if got < mustHave || got > last+100000 {
		t.Fatalf("after kill -9: counter %d; acknowledged %d at least 600ms before the kill, %d in all", got, mustHave, last)
	}
	t.Logf("after kill -9: counter %d, %d acknowledged in all (lost at most %d)", got, last, last-got)
}

// kill9Child increments until killed, printing its progress every 50ms.
func kill9Child(dir string) {
	s, err := Open(Options{Dir: dir})
	if err != nil {
		fmt.Println("open:", err)
		os.Exit(1)
	}
	ctx := context.Background()
	key := store.Key("c", "r", "n")
	next := time.Now()
	var n int64
	for {
		n, _ = s.Incr(ctx, key, 1, 0)
		if time.Now().After(next) {
			fmt.Printf("acked %d\n", n)
			next = time.Now().Add(50 * time.Millisecond)
		}
	}
}

// While a snapshot is being written (seconds, with millions of records),
// the journal still reaches the file every FlushInterval: the kill -9
// loss bound holds during a snapshot too.
func TestJournalFlushedDuringSnapshot(t *testing.T) {
	dir := t.TempDir()
	started, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	pause := func() {
		once.Do(func() { close(started) })
		<-release
	}
	snapshotPause.Store(&pause)
	defer snapshotPause.Store(nil)
	s := openT(t, Options{Dir: dir, SweepInterval: -1, FlushInterval: 5 * time.Millisecond, CompactBytes: 1})
	defer s.Close()
	defer close(release)
	ctx := t.Context()
	if err := s.Set(ctx, store.Key("192.0.2.1", "r", "before"), []byte("1"), 0); err != nil {
		t.Fatal(err)
	}
	select {
	case <-started:
	case <-time.After(10 * time.Second):
		t.Fatal("no snapshot started")
	}
	during := store.Key("192.0.2.2", "r", "during")
	if err := s.Set(ctx, during, []byte("2"), 0); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !journalHas(t, dir, during) {
		if time.Now().After(deadline) {
			t.Fatal("a record written during a snapshot did not reach the journal file within 10 s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// journalHas reports whether a journal file in dir holds a record of key.
func journalHas(t *testing.T, dir, key string) bool {
	t.Helper()
	names, _ := filepath.Glob(filepath.Join(dir, "journal.*"))
	for _, n := range names {
		f, err := os.Open(n)
		if err != nil {
			continue
		}
		found := false
		readRecords(f, func(p []byte) error {
			if _, k, _, err := decodeRecord(p); err == nil && k == key {
				found = true
			}
			return nil
		})
		f.Close()
		if found {
			return true
		}
	}
	return false
}
