package luaplugin

import (
	"context"
	"errors"
	"runtime/metrics"
	"sync"
	"time"
)

// A budget is the context a hook call's VM runs under: it ends when the
// script has run for its timeout, not counting the time it waits on the
// store (pause/resume), when the hook's own context ends, or when the
// heap watchdog stops every script at once.
type budget struct {
	context.Context
	cancel context.CancelCauseFunc

	// base is the heap when the call began: the watchdog stops the
	// call when the heap has grown HeapAllowance past it.
	base uint64

	mu      sync.Mutex
	timer   *time.Timer
	left    time.Duration
	started time.Time
}

var (
	errOverran  = errors.New("the script's time budget is spent")
	errOvergrew = errors.New("the heap grew past the scripts' allowance")
)

func newBudget(parent context.Context, d time.Duration) *budget {
	ctx, cancel := context.WithCancelCause(parent)
	b := &budget{Context: ctx, cancel: cancel, left: d, started: time.Now()}
	b.timer = time.AfterFunc(d, func() { cancel(errOverran) })
	watch.add(b)
	return b
}

// pause stops the clock while the script waits on something else.
func (b *budget) pause() {
	b.mu.Lock()
	if b.timer.Stop() {
		b.left -= time.Since(b.started)
	}
	b.mu.Unlock()
}

// resume starts the clock again with what is left.
func (b *budget) resume() {
	b.mu.Lock()
	b.started = time.Now()
	b.timer = time.AfterFunc(max(b.left, 0), func() { b.cancel(errOverran) })
	b.mu.Unlock()
}

// stop ends the budget; the call is over.
func (b *budget) stop() {
	b.mu.Lock()
	b.timer.Stop()
	b.mu.Unlock()
	watch.remove(b)
	b.cancel(nil)
}

func (b *budget) overran() bool  { return errors.Is(context.Cause(b), errOverran) }
func (b *budget) overgrew() bool { return errors.Is(context.Cause(b), errOvergrew) }

// HeapAllowance is how far the Go heap may grow during a script call
// (from the watchdog's reading when the call began) before the call is
// stopped. A time
// budget alone does not bound memory: "s = s .. s" doubles a string per
// instruction, and one string.rep is one instruction (string.rep is also
// capped, at MaxString).
var HeapAllowance uint64 = 256 << 20

// watchPeriod is how often the watchdog reads the heap while scripts run.
const watchPeriod = 2 * time.Millisecond

// watch is the process's one heap watchdog: it runs only while some
// script call does.
var watch watchdog

type watchdog struct {
	mu      sync.Mutex
	active  map[*budget]struct{}
	running bool
	// last is the heap at the watchdog's last reading: a call's base,
	// so the daemon's own growth between calls never counts against a
	// script.
	last uint64
}

func (w *watchdog) add(b *budget) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.active == nil {
		w.active = map[*budget]struct{}{}
	}
	if !w.running {
		w.last = heapBytes()
		w.running = true
		go w.loop()
	}
	b.base = w.last
	w.active[b] = struct{}{}
}

func (w *watchdog) remove(b *budget) {
	w.mu.Lock()
	delete(w.active, b)
	w.mu.Unlock()
}

func (w *watchdog) loop() {
	t := time.NewTicker(watchPeriod)
	defer t.Stop()
	for range t.C {
		w.mu.Lock()
		if len(w.active) == 0 {
			w.running = false
			w.mu.Unlock()
			return
		}
		w.mu.Unlock()
		cur := heapBytes()
		w.mu.Lock()
		w.last = cur
		for b := range w.active {
			if cur > b.base+HeapAllowance {
				b.cancel(errOvergrew)
			}
		}
		w.mu.Unlock()
	}
}

var heapSample = []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
var heapMu sync.Mutex

// heapBytes is the live and not yet swept heap, read without stopping
// the world.
func heapBytes() uint64 {
	heapMu.Lock()
	defer heapMu.Unlock()
	metrics.Read(heapSample)
	if heapSample[0].Value.Kind() != metrics.KindUint64 {
		return 0
	}
	return heapSample[0].Value.Uint64()
}
