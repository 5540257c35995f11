package memory

import (
	"fmt"
	"sync/atomic"
	"syscall"
)

// The table's slots and records live in anonymous mappings, outside the
// Go heap: they hold no pointers, so the collector has nothing to scan
// there, and memory it does not manage is not doubled by its headroom
// (GOGC). Pages past what the table has written are never touched, so a
// mapping's unused tail costs address space, not memory.

// failMaps makes every new mapping fail, as when memory runs out, so
// tests can check that nothing is lost or half-written then.
var failMaps atomic.Bool

func mapBytes(n int) ([]byte, error) {
	if failMaps.Load() {
		return nil, fmt.Errorf("map %d bytes (failMaps): %w", n, syscall.ENOMEM)
	}
	b, err := syscall.Mmap(-1, 0, n, syscall.PROT_READ|syscall.PROT_WRITE, syscall.MAP_ANON|syscall.MAP_PRIVATE)
	if err != nil {
		return nil, fmt.Errorf("map %d bytes: %w", n, err)
	}
	return b, nil
}

func unmapBytes(b []byte) {
	if cap(b) > 0 {
		// Only fails for a range that is not a mapping, which would be a
		// bug here; the memory is then merely kept.
		_ = syscall.Munmap(b[:cap(b)])
	}
}
