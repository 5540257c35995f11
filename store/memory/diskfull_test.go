package memory

import (
	"bytes"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/testing/testsync"
)

// smallDisk mounts a tmpfs of size bytes and returns its path. It needs
// root; without it the test is skipped, except under CI=true where it
// must run.
func smallDisk(t *testing.T, size int) string {
	t.Helper()
	if os.Geteuid() != 0 {
		if os.Getenv("CI") == "true" {
			t.Fatal("the disk-full test mounts a tmpfs and needs root under CI=true")
		}
		t.Skip("not root: cannot mount a small tmpfs for the disk-full test")
	}
	dir := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size="+strconv.Itoa(size), "tmpfs", dir).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", dir).Run() })
	return dir
}

// fillDisk writes to name until the disk is full.
func fillDisk(t *testing.T, name string) {
	t.Helper()
	f, err := os.Create(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	chunk := make([]byte, 4096)
	for {
		if _, err := f.Write(chunk); err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("filling the disk: %v", err)
			}
			return
		}
	}
}

// waitUntil polls cond until it holds, failing the test after 20 s.
func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// A full disk: the journal's buffer stays bounded, the errors are
// rate-limited, journals do not multiply, the store says since when it
// is behind, and when space returns it catches up by itself with
// nothing lost. Before: the buffer grew without bound, a snapshot and a
// new journal generation were tried (and logged) every 200 ms.
func TestDiskFull(t *testing.T) {
	// A failed snapshot waits an hour before its next try: the owed one
	// must still go out as soon as the disk takes writes again.
	old := snapshotRetryMin
	snapshotRetryMin = time.Hour
	t.Cleanup(func() { snapshotRetryMin = old })

	disk := smallDisk(t, 1<<20)
	dir := filepath.Join(disk, "state")
	logs := &testsync.Buffer{}
	const bound = 32 << 10
	s := openT(t, Options{Dir: dir, SweepInterval: -1, FlushInterval: 5 * time.Millisecond, CompactBytes: 8 << 10,
		MaxJournalBuffer: bound, Logger: slog.New(slog.NewTextHandler(logs, nil))})
	crashed := false
	defer func() {
		if !crashed {
			s.Close()
		}
	}()
	filler := filepath.Join(disk, "filler")
	fillDisk(t, filler)

	// Writes go on while nothing can be written. Until the first write
	// fails the buffer is whatever a flush interval brings; from then on
	// it is bounded.
	const n, rounds = 3000, 20
	gensBefore := len(s.j.journalGens())
	incrAll := func() {
		for i := range n {
			if _, err := s.Incr(t.Context(), counterKey(i), 1, 0); err != nil {
				t.Fatal(err)
			}
		}
	}
	incrAll()
	waitUntil(t, "a write failed", func() bool { return s.Persistence().Behind != "" })
	for round := 1; round < rounds; round++ {
		incrAll()
		if p := s.Persistence(); p.BufferBytes > bound+256 {
			t.Fatalf("round %d: journal buffer %d bytes, bound %d", round, p.BufferBytes, bound)
		}
	}
	p := s.Persistence()
	if p.DroppedRecords == 0 || !strings.Contains(p.Behind, "no space left") {
		t.Fatalf("persistence while full: %+v", p)
	}
	deg := strings.Join(s.Degraded(), "\n")
	if !strings.Contains(deg, "state not persisted since ") {
		t.Errorf("Degraded() = %q", deg)
	}
	if g := len(s.j.journalGens()); g > gensBefore+1 {
		t.Errorf("%d journal generations after the failed snapshots, had %d", g, gensBefore)
	}
	for _, msg := range []string{"state not persisted: the journal cannot be written", "state snapshot failed"} {
		if c := strings.Count(logs.String(), msg); c > 1 {
			t.Errorf("%q logged %d times in a few seconds, want at most once:\n%s", msg, c, logs.String())
		}
	}
	if c := strings.Count(logs.String(), "dropping buffered records"); c != 1 {
		t.Errorf("the drop logged %d times, want once", c)
	}

	// Space returns: the store catches up by itself.
	os.Remove(filler)
	waitUntil(t, "the state is persisted again", func() bool { return s.Persistence().Behind == "" })
	if deg := s.Degraded(); deg != nil {
		t.Errorf("still degraded after recovery: %q", deg)
	}
	// The line is written just after the state says so: wait for it.
	waitUntil(t, "the recovery is logged", func() bool { return strings.Contains(logs.String(), "state persisted again") })
	// Nothing acknowledged is lost, the dropped records included: a
	// crash now (no snapshot at Close) still finds every counter at 20.
	crash(s)
	crashed = true
	s2, out, _ := reopen(t, dir, 0, Options{})
	for i := range n {
		if v, _, _ := s2.Get(t.Context(), counterKey(i)); string(v) != strconv.Itoa(rounds) {
			t.Fatalf("counter %d = %q after recovery and a crash, want %d\n%s", i, v, rounds, out)
		}
	}
	if bytes.Contains([]byte(out), []byte("damaged")) && !strings.Contains(out, "cut short") {
		t.Logf("load after recovery reported damage (a record cut by the short write):\n%s", out)
	}
}
