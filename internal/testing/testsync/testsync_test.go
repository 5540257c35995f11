package testsync

import (
	"fmt"
	"sync"
	"testing"
)

func TestBufferAndCounter(t *testing.T) {
	var b Buffer
	var c Counter
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Go(func() {
			fmt.Fprintf(&b, "line %d\n", i)
			c.Add("write")
		})
	}
	wg.Wait()
	if got := c.Get("write"); got != 4 {
		t.Fatalf("counted %d writes, want 4", got)
	}
	if c.Get("other") != 0 {
		t.Fatal("an event never added was counted")
	}
	if got := Tail(b.String(), 2); len(got) != len("line 0\nline 1") {
		t.Fatalf("Tail = %q", got)
	}
	if got := Tail("a\nb\nc\n", 5); got != "a\nb\nc" {
		t.Fatalf("Tail of a short text = %q", got)
	}
}
