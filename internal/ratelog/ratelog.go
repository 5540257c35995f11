// Package ratelog lets one log line through per interval and counts the
// ones it held back, so a dead Redis or a hostile client produces a
// trickle of lines, not a flood.
package ratelog

import (
	"sync"
	"time"
)

// Limiter is safe for concurrent use. The zero value lets every line through.
type Limiter struct {
	mu         sync.Mutex
	Every      time.Duration
	last       time.Time
	suppressed int
}

// New returns a limiter letting one line per every through.
func New(every time.Duration) *Limiter { return &Limiter{Every: every} }

// Allow reports whether to log now, and how many lines were held back
// since the last one that went through.
func (l *Limiter) Allow(now time.Time) (suppressed int, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.last.IsZero() && now.Sub(l.last) < l.Every {
		l.suppressed++
		return 0, false
	}
	n := l.suppressed
	l.suppressed, l.last = 0, now
	return n, true
}
