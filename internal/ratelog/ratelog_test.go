package ratelog

import (
	"testing"
	"time"
)

func TestLimiter(t *testing.T) {
	l := New(time.Second)
	t0 := time.Unix(1000, 0)
	steps := []struct {
		at   time.Duration
		ok   bool
		supp int
	}{
		{0, true, 0},
		{100 * time.Millisecond, false, 0},
		{900 * time.Millisecond, false, 0},
		{time.Second, true, 2},
		{1500 * time.Millisecond, false, 0},
		{3 * time.Second, true, 1},
	}
	for i, st := range steps {
		n, ok := l.Allow(t0.Add(st.at))
		if ok != st.ok || n != st.supp {
			t.Errorf("step %d: Allow = %d, %v; want %d, %v", i, n, ok, st.supp, st.ok)
		}
	}
}
