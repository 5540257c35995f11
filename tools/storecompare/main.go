// Command storecompare measures policyd's mail-path store workload on the
// embedded memory store (store/memory, the daemon's choice) and on two
// embedded key-value libraries, bbolt and pebble, each set up with about
// the same crash-loss bound. See README.md for what it measures and the
// results.
//
// The command runs each backend in a child process of its own (the same
// binary with -child), so memory figures are per backend, and prints
// Markdown tables.
package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"hash/maphash"
	"io/fs"
	"math/bits"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/cockroachdb/pebble/v2"
	"github.com/cockroachdb/pebble/v2/bloom"
	bolt "go.etcd.io/bbolt"

	"github.com/policyd-mail/policyd/store"
	"github.com/policyd-mail/policyd/store/memory"
)

// The two records a session touches, as policyd's rules write them.
const (
	counterTTL = 60 * time.Second    // connection_shaper's exptime
	statsTTL   = 30 * 24 * time.Hour // client_stats' expire
	statsField = "success"
)

var backends = map[string]func(dir string) (backend, error){
	"memory":       openMemory,
	"bbolt":        func(dir string) (backend, error) { return openBolt(dir, false) },
	"bbolt-nosync": func(dir string) (backend, error) { return openBolt(dir, true) },
	"pebble":       openPebble,
}

// backend is one store under test.
type backend interface {
	// session does one SMTP session's writes for client c: the counter
	// increment and the client_stats record update.
	session(c int) error
	// stats reads client c's client_stats record: its success count and
	// whether it exists.
	stats(c int) (int64, bool, error)
	close() error
}

func openBackend(name, dir string) (backend, error) {
	open, ok := backends[name]
	if !ok {
		return nil, fmt.Errorf("unknown backend %q", name)
	}
	return open(dir)
}

// synced is implemented by backends that know how many sessions their
// last fsync covered; acked is the count of completed sessions.
type synced interface{ syncedSessions() int64 }

var (
	acked   atomic.Int64 // sessions completed, for the crash check
	workers int
	clients int
	// pebble tuning, set by flags.
	pebbleCacheMB, pebbleMemtableMB int
)

func main() {
	list := flag.String("backends", "memory,bbolt,bbolt-nosync,pebble", "backends to measure, comma-separated")
	flag.IntVar(&clients, "clients", 1_000_000, "distinct client IPv4 addresses")
	flag.IntVar(&workers, "workers", 16, "concurrent sessions")
	duration := flag.Duration("duration", 10*time.Second, "length of the measured run, after the fill")
	kills := flag.String("kills", "2s,4s,6s,8s", "kill -9 checks: how long each writes before the kill, comma-separated; empty for none")
	base := flag.String("dir", "", "where to put the stores (default: the system temp directory)")
	flag.IntVar(&pebbleCacheMB, "pebble-cache-mb", 64, "pebble block cache size")
	flag.IntVar(&pebbleMemtableMB, "pebble-memtable-mb", 32, "pebble memtable size")
	child := flag.String("child", "", "internal: run, crash or recover")
	name := flag.String("backend", "", "internal: the backend of a child")
	path := flag.String("path", "", "internal: the store directory of a child")
	issued := flag.Int("issued", 0, "internal: sessions started before the kill")
	crashAfter := flag.Duration("crash-after", 0, "internal: when a crash child kills itself")
	flag.Parse()

	var err error
	switch *child {
	case "":
		err = drive(strings.Split(*list, ","), *base, *duration, *kills)
	case "run":
		err = childRun(*name, *path, *duration)
	case "crash":
		err = childCrash(*name, *path, *crashAfter)
	case "recover":
		err = childRecover(*name, *path, *issued)
	default:
		err = fmt.Errorf("unknown -child %q", *child)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "storecompare:", err)
		os.Exit(1)
	}
}

// Keys. Client i gets an address spread over the IPv4 space (an odd
// multiplier is a bijection mod 2^32), so most clients sit in /24s of
// their own.

func clientAddr(c int) netip.Addr {
	x := uint32(c)*0x9E3779B1 + 0x01000000
	return netip.AddrFrom4([4]byte{byte(x >> 24), byte(x >> 16), byte(x >> 8), byte(x)})
}

// counterKey is connection_shaper's key, policyd:{10.1.2.3}:connection_shaper:sessions.
func counterKey(c int) string {
	return store.NewKeys("connection_shaper", 64).Client(clientAddr(c), "sessions")
}

// statsKey is client_stats' /32 record, policyd:{10.0.0.0/8}:client_stats:@10.1.2.3/32.
func statsKey(c int) string {
	a := clientAddr(c)
	return store.NewKeys("client_stats", 64).Net(netip.PrefixFrom(a, 8).Masked(), netip.PrefixFrom(a, 32))
}

// The memory store: the daemon's own code, default options (journal
// written every 200 ms, fsynced every 1 s).

type memStore struct{ s *memory.Store }

func openMemory(dir string) (backend, error) {
	s, err := memory.Open(memory.Options{Dir: dir})
	if err != nil {
		return nil, err
	}
	return memStore{s}, nil
}

func (m memStore) session(c int) error {
	ctx := context.Background()
	if _, err := m.s.Incr(ctx, counterKey(c), 1, counterTTL); err != nil {
		return err
	}
	return m.s.HIncr(ctx, statsTTL, store.FieldIncr{Key: statsKey(c), Field: statsField, Delta: 1})
}

func (m memStore) stats(c int) (int64, bool, error) {
	recs, err := m.s.HGet(context.Background(), statsKey(c))
	if err != nil || recs[0] == nil {
		return 0, false, err
	}
	return recs[0][statsField], true, nil
}

func (m memStore) close() error { return m.s.Close() }

// Values in bbolt and pebble: the expiry (unix nanoseconds, 8 bytes big
// endian, 0 for none), then a counter's varint, or a hash's fields as
// (uvarint name length, name, varint value) each.

func expired(v []byte, now int64) bool {
	if len(v) < 8 {
		return true
	}
	exp := int64(binary.BigEndian.Uint64(v))
	return exp != 0 && now >= exp
}

// incrValue is Store.Incr on a stored value: a missing or expired counter
// starts at 0 with a fresh expiry, a live one keeps its expiry.
func incrValue(old []byte, now int64, ttl time.Duration) []byte {
	var n int64
	exp := now + int64(ttl)
	if !expired(old, now) {
		exp = int64(binary.BigEndian.Uint64(old))
		n, _ = binary.Varint(old[8:])
	}
	v := binary.BigEndian.AppendUint64(make([]byte, 0, 18), uint64(exp))
	return binary.AppendVarint(v, n+1)
}

// hincrValue is Store.HIncr of one field on a stored value: the record
// lives ttl after this update.
func hincrValue(old []byte, now int64, field string, ttl time.Duration) []byte {
	v := binary.BigEndian.AppendUint64(make([]byte, 0, 32), uint64(now+int64(ttl)))
	found := false
	if !expired(old, now) {
		for p := old[8:]; len(p) > 0; {
			name, n, rest := nextField(p)
			if name == field {
				n++
				found = true
			}
			v = appendField(v, name, n)
			p = rest
		}
	}
	if !found {
		v = appendField(v, field, 1)
	}
	return v
}

// hashField reads field from a stored hash; ok is false if the record is
// missing or expired.
func hashField(v []byte, now int64, field string) (n int64, ok bool) {
	if expired(v, now) {
		return 0, false
	}
	for p := v[8:]; len(p) > 0; {
		name, n, rest := nextField(p)
		if name == field {
			return n, true
		}
		p = rest
	}
	return 0, true
}

func appendField(v []byte, name string, n int64) []byte {
	v = binary.AppendUvarint(v, uint64(len(name)))
	v = append(v, name...)
	return binary.AppendVarint(v, n)
}

// nextField decodes the first field of p. The values are our own, so a
// malformed one is a bug: it panics.
func nextField(p []byte) (name string, n int64, rest []byte) {
	l, k := binary.Uvarint(p)
	name, p = string(p[k:k+int(l)]), p[k+int(l):]
	n, k = binary.Varint(p)
	if k <= 0 {
		panic("malformed hash value")
	}
	return name, n, p[k:]
}

// bbolt: one bucket; a session's two read-modify-writes are one function
// given to db.Batch, so the sessions of all workers share a commit and
// its fsync. MaxBatchSize is the worker count, so a batch commits as soon
// as every worker has joined it instead of after MaxBatchDelay (10 ms).

var bucket = []byte("policyd")

type boltStore struct{ db *bolt.DB }

func openBolt(dir string, noSync bool) (backend, error) {
	db, err := bolt.Open(filepath.Join(dir, "bolt.db"), 0o600, &bolt.Options{
		NoSync: noSync,
		// etcd's settings: no freelist written at each commit (it is
		// rebuilt at open), kept as a hash map.
		NoFreelistSync:  true,
		FreelistType:    bolt.FreelistMapType,
		InitialMmapSize: 4 << 30, // no remapping (which blocks readers) while growing
	})
	if err != nil {
		return nil, err
	}
	db.MaxBatchSize = workers
	err = db.Update(func(tx *bolt.Tx) error {
		_, err := tx.CreateBucketIfNotExists(bucket)
		return err
	})
	if err != nil {
		db.Close()
		return nil, err
	}
	return boltStore{db}, nil
}

func (b boltStore) session(c int) error {
	k1, k2 := []byte(counterKey(c)), []byte(statsKey(c))
	now := time.Now().UnixNano()
	// Batch may run the function again on a retry: it only depends on
	// what it reads inside the transaction, so that is safe.
	return b.db.Batch(func(tx *bolt.Tx) error {
		bk := tx.Bucket(bucket)
		if err := bk.Put(k1, incrValue(bk.Get(k1), now, counterTTL)); err != nil {
			return err
		}
		return bk.Put(k2, hincrValue(bk.Get(k2), now, statsField, statsTTL))
	})
}

func (b boltStore) stats(c int) (n int64, ok bool, err error) {
	k := []byte(statsKey(c))
	now := time.Now().UnixNano()
	err = b.db.View(func(tx *bolt.Tx) error {
		if v := tx.Bucket(bucket).Get(k); v != nil {
			n, ok = hashField(v, now, statsField)
		}
		return nil
	})
	return n, ok, err
}

// syncedSessions: every acknowledged Batch has been fsynced (unless
// NoSync, where nothing is, but a kill -9 loses nothing either).
func (b boltStore) syncedSessions() int64 {
	if b.db.NoSync {
		return 0
	}
	return acked.Load()
}

func (b boltStore) close() error { return b.db.Close() }

// pebble: writes go to the WAL without waiting for an fsync
// (pebble.NoSync); a goroutine syncs the WAL once a second with an empty
// synced LogData, which makes every write before it durable. Pebble has no
// read-modify-write on a plain DB, so striped mutexes (by key) keep two
// sessions of one client from losing each other's increment; a session's
// two writes are one batch.

const stripes = 1024

type pebbleStore struct {
	db     *pebble.DB
	seed   maphash.Seed
	locks  [stripes]sync.Mutex
	synced atomic.Int64
	stop   chan struct{}
	done   chan struct{}
}

func openPebble(dir string) (backend, error) {
	cache := pebble.NewCache(int64(pebbleCacheMB) << 20)
	defer cache.Unref()
	opts := &pebble.Options{
		Cache:        cache,
		MemTableSize: uint64(pebbleMemtableMB) << 20,
		Logger:       quietLogger{},
	}
	// Bloom filters on every level (L0's setting is inherited), so a Get
	// skips the tables that do not hold its key; pebble has none by default.
	opts.Levels[0].FilterPolicy = bloom.FilterPolicy(10)
	db, err := pebble.Open(dir, opts)
	if err != nil {
		return nil, err
	}
	p := &pebbleStore{db: db, seed: maphash.MakeSeed(), stop: make(chan struct{}), done: make(chan struct{})}
	go p.syncLoop()
	return p, nil
}

func (p *pebbleStore) syncLoop() {
	defer close(p.done)
	t := time.NewTicker(time.Second)
	defer t.Stop()
	for {
		select {
		case <-p.stop:
			return
		case <-t.C:
			before := acked.Load()
			if err := p.db.LogData(nil, pebble.Sync); err != nil {
				fmt.Fprintln(os.Stderr, "pebble sync:", err)
				continue
			}
			p.synced.Store(before)
		}
	}
}

func (p *pebbleStore) syncedSessions() int64 { return p.synced.Load() }

// get returns a copy of key's value, nil if missing.
func (p *pebbleStore) get(key []byte) ([]byte, error) {
	v, closer, err := p.db.Get(key)
	if errors.Is(err, pebble.ErrNotFound) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	v = bytes.Clone(v)
	return v, closer.Close()
}

func (p *pebbleStore) session(c int) error {
	k1, k2 := []byte(counterKey(c)), []byte(statsKey(c))
	// Lock both keys' stripes in index order, so no two sessions deadlock.
	i1 := maphash.Bytes(p.seed, k1) % stripes
	i2 := maphash.Bytes(p.seed, k2) % stripes
	if i1 > i2 {
		i1, i2 = i2, i1
	}
	p.locks[i1].Lock()
	defer p.locks[i1].Unlock()
	if i2 != i1 {
		p.locks[i2].Lock()
		defer p.locks[i2].Unlock()
	}
	now := time.Now().UnixNano()
	v1, err := p.get(k1)
	if err != nil {
		return err
	}
	v2, err := p.get(k2)
	if err != nil {
		return err
	}
	b := p.db.NewBatch()
	b.Set(k1, incrValue(v1, now, counterTTL), nil)
	b.Set(k2, hincrValue(v2, now, statsField, statsTTL), nil)
	if err := b.Commit(pebble.NoSync); err != nil {
		return err
	}
	return b.Close()
}

func (p *pebbleStore) stats(c int) (int64, bool, error) {
	v, err := p.get([]byte(statsKey(c)))
	if err != nil || v == nil {
		return 0, false, err
	}
	n, ok := hashField(v, time.Now().UnixNano(), statsField)
	return n, ok, nil
}

func (p *pebbleStore) close() error {
	close(p.stop)
	<-p.done
	return p.db.Close()
}

// quietLogger drops pebble's informational messages (flushes,
// compactions), which would otherwise clutter the output.
type quietLogger struct{}

func (quietLogger) Infof(string, ...any) {}
func (quietLogger) Errorf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "pebble: "+format+"\n", args...)
}
func (quietLogger) Fatalf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "pebble: "+format+"\n", args...)
	os.Exit(1)
}

// Latency histogram: log-linear buckets, 16 per power of two (about 6 %
// wide), so a worker's record is a fixed array rather than one entry per
// session, which would show up in the RSS being measured.

const histBuckets = 16 + 60*16

type hist [histBuckets]uint64

func bucketOf(ns int64) int {
	if ns < 16 {
		return int(max(ns, 0))
	}
	b := bits.Len64(uint64(ns)) // >= 5
	return (b-4)*16 + int(uint64(ns)>>(b-5)&15)
}

// upper is the smallest duration above bucket i.
func upper(i int) time.Duration {
	i++
	if i < 16 {
		return time.Duration(i)
	}
	b, m := i/16+4, i%16
	return time.Duration(uint64(16+m) << (b - 5))
}

func (h *hist) add(o *hist) {
	for i := range h {
		h[i] += o[i]
	}
}

func (h *hist) quantile(q float64) time.Duration {
	var total uint64
	for _, n := range h {
		total += n
	}
	want := uint64(q * float64(total))
	var seen uint64
	for i, n := range h {
		seen += n
		if seen > want {
			return upper(i)
		}
	}
	return 0
}

// Load. Each worker runs sessions until next says stop.

func load(b backend, next func(w int, r *rand.Rand) (c int, ok bool)) (sessions int64, h hist, err error) {
	var wg sync.WaitGroup
	var mu sync.Mutex
	for w := range workers {
		wg.Go(func() {
			r := rand.New(rand.NewPCG(uint64(w), uint64(time.Now().UnixNano())))
			var mine hist
			var n int64
			var werr error
			for {
				c, ok := next(w, r)
				if !ok {
					break
				}
				start := time.Now()
				if werr = b.session(c); werr != nil {
					break
				}
				mine[bucketOf(int64(time.Since(start)))]++
				n++
				acked.Add(1)
			}
			mu.Lock()
			sessions += n
			h.add(&mine)
			if err == nil {
				err = werr
			}
			mu.Unlock()
		})
	}
	wg.Wait()
	return sessions, h, err
}

// fill does one session for each client, in order.
func fill(b backend) (time.Duration, error) {
	var next atomic.Int64
	start := time.Now()
	_, _, err := load(b, func(int, *rand.Rand) (int, bool) {
		c := int(next.Add(1) - 1)
		return c, c < clients
	})
	return time.Since(start), err
}

// result is what a "run" child reports.
type result struct {
	Backend                 string
	FillSeconds             float64
	Sessions                int64
	RunSeconds              float64
	P50, P99                time.Duration
	RSSFill, RSSRun         int64 // VmRSS, bytes
	RSSFileFill, RSSFileRun int64 // of which file-backed (bbolt's mapped file)
	Disk, DiskClosed        int64 // bytes in the store directory after the run, after the close
	CloseSeconds            float64
	RestartSeconds          float64 // open and the first read
	CheckSum, CheckWant     int64   // success counts summed over every client after the restart
	CheckSeconds            float64
}

func childRun(name, dir string, d time.Duration) error {
	b, err := openBackend(name, dir)
	if err != nil {
		return err
	}
	res := result{Backend: name}
	took, err := fill(b)
	if err != nil {
		return fmt.Errorf("fill: %w", err)
	}
	res.FillSeconds = took.Seconds()
	res.RSSFill, res.RSSFileFill = rss()

	start := time.Now()
	deadline := start.Add(d)
	n, h, err := load(b, func(_ int, r *rand.Rand) (int, bool) {
		return r.IntN(clients), time.Now().Before(deadline)
	})
	if err != nil {
		return fmt.Errorf("run: %w", err)
	}
	res.RunSeconds = time.Since(start).Seconds()
	res.Sessions, res.P50, res.P99 = n, h.quantile(0.50), h.quantile(0.99)
	res.RSSRun, res.RSSFileRun = rss()
	res.Disk = dirSize(dir)

	start = time.Now()
	if err := b.close(); err != nil {
		return fmt.Errorf("close: %w", err)
	}
	res.CloseSeconds = time.Since(start).Seconds()
	res.DiskClosed = dirSize(dir)
	start = time.Now()
	if b, err = openBackend(name, dir); err != nil {
		return fmt.Errorf("reopen: %w", err)
	}
	if _, ok, err := b.stats(0); err != nil || !ok {
		return fmt.Errorf("first read after reopen: found %v, %v", ok, err)
	}
	res.RestartSeconds = time.Since(start).Seconds()

	// Every session added one success to its client's record.
	start = time.Now()
	for c := range clients {
		s, _, err := b.stats(c)
		if err != nil {
			return fmt.Errorf("check: %w", err)
		}
		res.CheckSum += s
	}
	res.CheckWant = int64(clients) + n
	res.CheckSeconds = time.Since(start).Seconds()
	if err := b.close(); err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

// childCrash writes sessions of new clients (0, 1, 2, ...) for d, noting
// every 10 ms how many have been acknowledged, then prints that history
// (and what the backend's last sync covered, if it knows) and kills
// itself with SIGKILL.
func childCrash(name, dir string, d time.Duration) error {
	b, err := openBackend(name, dir)
	if err != nil {
		return err
	}
	var next atomic.Int64
	start := time.Now()
	go load(b, func(int, *rand.Rand) (int, bool) { return int(next.Add(1) - 1), true })
	var k killed
	tick := time.NewTicker(10 * time.Millisecond)
	for time.Since(start) < d {
		<-tick.C
		k.At = append(k.At, time.Since(start))
		k.History = append(k.History, acked.Load())
	}
	k.Synced = -1
	if s, ok := b.(synced); ok {
		k.Synced = s.syncedSessions()
	}
	k.Acked, k.Issued, k.Killed = acked.Load(), next.Load(), time.Since(start)
	out, _ := json.Marshal(k)
	// One write(2), then the kill: the sessions still running get no
	// chance to reach the disk.
	os.Stdout.Write(append(out, '\n'))
	syscall.Kill(os.Getpid(), syscall.SIGKILL)
	select {}
}

// killed is what a "crash" child prints before it kills itself.
type killed struct {
	Acked  int64 // sessions acknowledged at the kill
	Synced int64 // of which covered by the last fsync; -1: not known
	Issued int64 // sessions started: clients 0 to Issued-1
	// History is Acked every 10 ms, At when each was taken, Killed when
	// the kill came.
	History []int64
	At      []time.Duration
	Killed  time.Duration
}

// lossWindow is how long before the kill the recovered state was
// current: the time since the last note of fewer acknowledged sessions
// than were recovered (an upper bound, by up to one 10 ms step).
func (k killed) lossWindow(recovered int64) time.Duration {
	if recovered >= k.Acked {
		return 0
	}
	for i := len(k.History) - 1; i >= 0; i-- {
		if k.History[i] <= recovered {
			return k.Killed - k.At[i]
		}
	}
	return k.Killed
}

// recovery is what a "recover" child reports.
type recovery struct {
	RecoverSeconds float64
	Recovered      int64 // clients below -issued whose record exists
}

func childRecover(name, dir string, issued int) error {
	start := time.Now()
	b, err := openBackend(name, dir)
	if err != nil {
		return err
	}
	if _, _, err := b.stats(0); err != nil {
		return err
	}
	res := recovery{RecoverSeconds: time.Since(start).Seconds()}
	for c := range issued {
		_, ok, err := b.stats(c)
		if err != nil {
			return err
		}
		if ok {
			res.Recovered++
		}
	}
	if err := b.close(); err != nil {
		return err
	}
	return json.NewEncoder(os.Stdout).Encode(res)
}

// rss reads the process's resident set and its file-backed part.
func rss() (total, file int64) {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return -1, -1
	}
	for line := range strings.Lines(string(data)) {
		k, v, _ := strings.Cut(line, ":")
		f := strings.Fields(v)
		if len(f) == 0 {
			continue
		}
		kb, _ := strconv.ParseInt(f[0], 10, 64)
		switch k {
		case "VmRSS":
			total = kb << 10
		case "RssFile":
			file = kb << 10
		}
	}
	return total, file
}

// dirSize adds up the sizes of the files under dir.
func dirSize(dir string) int64 {
	var n int64
	filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				n += fi.Size()
			}
		}
		return nil
	})
	return n
}

// The driver.

type crashOutcome struct {
	killed
	recovery
	Note string
}

func drive(names []string, base string, d time.Duration, kills string) error {
	for _, n := range names {
		if _, ok := backends[n]; !ok {
			return fmt.Errorf("unknown backend %q", n)
		}
	}
	var killAfter []time.Duration
	for f := range strings.SplitSeq(kills, ",") {
		if f = strings.TrimSpace(f); f == "" {
			continue
		}
		k, err := time.ParseDuration(f)
		if err != nil {
			return fmt.Errorf("-kills: %w", err)
		}
		killAfter = append(killAfter, k)
	}
	self, err := os.Executable()
	if err != nil {
		return err
	}
	common := []string{"-clients", strconv.Itoa(clients), "-workers", strconv.Itoa(workers),
		"-pebble-cache-mb", strconv.Itoa(pebbleCacheMB), "-pebble-memtable-mb", strconv.Itoa(pebbleMemtableMB)}
	child := func(args ...string) ([]byte, error) {
		cmd := exec.Command(self, append(common, args...)...)
		cmd.Stderr = os.Stderr
		return cmd.Output()
	}
	fmt.Fprintf(os.Stderr, "%d clients, %d workers, %s run, %s\n", clients, workers, d, time.Now().Format(time.DateTime))

	var results []result
	crashes := map[string][]crashOutcome{}
	for _, name := range names {
		dir, err := os.MkdirTemp(base, "storecompare-"+name+"-")
		if err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "%s: fill and run in %s\n", name, dir)
		out, err := child("-child", "run", "-backend", name, "-path", dir, "-duration", d.String())
		os.RemoveAll(dir)
		if err != nil {
			return fmt.Errorf("%s: %w", name, err)
		}
		var r result
		if err := json.Unmarshal(out, &r); err != nil {
			return fmt.Errorf("%s: %w (output %q)", name, err, out)
		}
		results = append(results, r)
		fmt.Fprintf(os.Stderr, "%s: %.0f sessions/s\n", name, float64(r.Sessions)/r.RunSeconds)
		for _, after := range killAfter {
			c, err := crashCheck(child, base, name, after)
			if err != nil {
				return fmt.Errorf("%s kill -9 check: %w", name, err)
			}
			crashes[name] = append(crashes[name], c)
		}
	}
	report(results, crashes)
	return nil
}

func crashCheck(child func(...string) ([]byte, error), base, name string, after time.Duration) (crashOutcome, error) {
	var c crashOutcome
	dir, err := os.MkdirTemp(base, "storecompare-crash-"+name+"-")
	if err != nil {
		return c, err
	}
	defer os.RemoveAll(dir)
	fmt.Fprintf(os.Stderr, "%s: kill -9 check in %s\n", name, dir)
	out, err := child("-child", "crash", "-backend", name, "-path", dir, "-crash-after", after.String())
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		return c, fmt.Errorf("the child was not killed: %v", err)
	}
	if err := json.Unmarshal(out, &c.killed); err != nil {
		return c, fmt.Errorf("child said %q: %w", out, err)
	}
	// The memory store writes its snapshot here, then renames it.
	if _, err := os.Stat(filepath.Join(dir, "snapshot.tmp")); err == nil {
		c.Note = "killed while writing a snapshot"
	}
	out, err = child("-child", "recover", "-backend", name, "-path", dir, "-issued", strconv.FormatInt(c.Issued, 10))
	if err != nil {
		return c, err
	}
	err = json.Unmarshal(out, &c.recovery)
	return c, err
}

func report(results []result, crashes map[string][]crashOutcome) {
	w := bufio.NewWriter(os.Stdout)
	defer w.Flush()
	var base float64
	for _, r := range results {
		if r.Backend == "memory" {
			base = float64(r.Sessions) / r.RunSeconds
		}
	}
	fmt.Fprintln(w, "| backend | sessions/s | vs memory | p50 | p99 | fill | RSS after fill | RSS after run | disk after run | close | disk after close | restart | check |")
	fmt.Fprintln(w, "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|")
	for _, r := range results {
		rate := float64(r.Sessions) / r.RunSeconds
		ratio := "-"
		if base > 0 {
			ratio = fmt.Sprintf("%.2f", rate/base)
		}
		check := "ok"
		if r.CheckSum != r.CheckWant {
			check = fmt.Sprintf("%d of %d", r.CheckSum, r.CheckWant)
		}
		fmt.Fprintf(w, "| %s | %.0f | %s | %s | %s | %.1f s | %s | %s | %s | %.2f s | %s | %.2f s | %s |\n",
			r.Backend, rate, ratio, latency(r.P50), latency(r.P99), r.FillSeconds,
			rssText(r.RSSFill, r.RSSFileFill), rssText(r.RSSRun, r.RSSFileRun), mb(r.Disk),
			r.CloseSeconds, mb(r.DiskClosed), r.RestartSeconds, check)
	}
	if len(crashes) == 0 {
		return
	}
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| backend | killed after | sessions acked | of which fsynced | records recovered | acked, not recovered | loss window | recovery (open + first read) | note |")
	fmt.Fprintln(w, "|---|--:|--:|--:|--:|--:|--:|--:|---|")
	for _, r := range results {
		for _, c := range crashes[r.Backend] {
			syncedText := "not observable"
			if c.Synced >= 0 {
				syncedText = strconv.FormatInt(c.Synced, 10)
			}
			fmt.Fprintf(w, "| %s | %.1f s | %d | %s | %d | %d | %s | %.2f s | %s |\n",
				r.Backend, c.Killed.Seconds(), c.Acked, syncedText, c.Recovered, max(0, c.Acked-c.Recovered),
				latency(c.lossWindow(c.Recovered)), c.RecoverSeconds, c.Note)
		}
	}
}

func mb(n int64) string { return fmt.Sprintf("%.0f MB", float64(n)/1e6) }

// rssText shows the resident set with its file-backed part (the
// binary's own pages, and bbolt's mapped file).
func rssText(total, file int64) string {
	return fmt.Sprintf("%s (%s file)", mb(total), mb(file))
}

func latency(d time.Duration) string {
	if d < time.Millisecond {
		return fmt.Sprintf("%.0f µs", float64(d)/1e3)
	}
	return fmt.Sprintf("%.1f ms", float64(d)/1e6)
}
