package store

import (
	"fmt"
	"math"
	"time"
)

// Rate is one budget of a Limit call, kept by the generic cell rate
// algorithm (GCRA): Limit units per Period, any of them at once. The
// budget is one number, its theoretical arrival time (TAT, unix
// microseconds, in the field Field of the key's hash): a request of cost
// c at now moves it to max(TAT, now) + c·Period/Limit, and conforms when
// that lies at most Period after now. The budget's count at now is
// (TAT−now)·Limit/Period, so a budget that took N units at once is full,
// and refills one unit every Period/Limit.
//
// Worst case: over any span of length Period, a budget lets through at
// most 2·Limit−1 units (Limit at once at its start, then one per
// Period/Limit); over any longer span t, Limit + t·Limit/Period. A
// fixed window lets 2·Limit through within moments around its boundary,
// and then Limit more in its next window; GCRA gives the burst once and
// then only the rate.
type Rate struct {
	Field  string // the budget's field in the key's hash: a key WORD
	Limit  int64  // units per Period, > 0
	Period time.Duration
	Cost   int64 // units this request takes; 0 only reads the count
}

// Every backend runs the same arithmetic, in float64 as Redis's Lua does,
// so a budget reads the same on both: the TAT is stored rounded to the
// microsecond (float64 holds today's unix microseconds exactly), and a
// budget's count is the units its TAT lies ahead of now, a started unit
// counting whole, with half a microsecond of slack for that rounding.

// RateStep is one budget's step of Limit: from the stored TAT (ok false
// when there is none) at nowUS, the TAT the request would leave and the
// count it would make, and whether it conforms (the count is within the
// limit). Backends in Go use it; the Redis script is the same
// arithmetic in Lua.
func RateStep(r Rate, tat int64, ok bool, nowUS int64) (next int64, used int64, conforms bool) {
	if r.Cost > r.Limit {
		// More than the whole budget (a SIZE= of 2^63): never conforms,
		// and kept out of the arithmetic, where it would overflow.
		return tat, r.Cost, false
	}
	interval := float64(r.Period.Microseconds()) / float64(r.Limit)
	now := float64(nowUS)
	start := now
	if ok && float64(tat) > start {
		start = float64(tat)
	}
	end := start + float64(r.Cost)*interval
	count := int64(math.Max(0, math.Ceil((end-now-0.5)/interval)))
	return int64(math.Floor(end + 0.5)), count, count <= r.Limit
}

// CheckRates refuses rates a backend cannot keep.
func CheckRates(rates []Rate) error {
	for _, r := range rates {
		if !isWord(r.Field) || r.Limit <= 0 || r.Period < time.Millisecond || r.Cost < 0 {
			return fmt.Errorf("store: bad rate %+v", r)
		}
	}
	return nil
}
