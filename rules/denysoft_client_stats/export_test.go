package denysoftclientstats

// SetDraw makes the rules built from now on draw from f instead of the
// random source; the returned function undoes it. Tests using it must not
// run in parallel.
func SetDraw(f func() float64) (restore func()) {
	old := newDraw
	newDraw = func(int64) func() float64 { return f }
	return func() { newDraw = old }
}
