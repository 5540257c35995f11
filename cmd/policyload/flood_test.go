package main

import (
	"context"
	"io"
	"net"
	"testing"
	"time"
)

// A flood against a server that hangs up is "dropped"; against one that
// reads everything, "took-all".
func TestFlood(t *testing.T) {
	for _, tc := range []struct {
		flood, want string
		limit       int64 // what the server reads before it hangs up; 0: all
	}{
		{"headers", "dropped", 1 << 20},
		{"headers", "took-all", 0},
		{"macros", "dropped", 1 << 20},
		{"macros", "took-all", 0},
	} {
		t.Run(tc.flood+" "+tc.want, func(t *testing.T) {
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer ln.Close()
			go func() {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				if tc.limit > 0 {
					io.CopyN(io.Discard, c, tc.limit)
					// Unread input makes the close a reset, as a
					// server that drops a flood does.
					c.Close()
					return
				}
				io.Copy(io.Discard, c)
				c.Close()
			}()
			cfg := &config{proto: "milter", addr: ln.Addr().String(), timeout: 5 * time.Second, flood: tc.flood}
			got, err := floodOnce(context.Background(), cfg)
			if err != nil || got != tc.want {
				t.Fatalf("got %q, %v; want %q", got, err, tc.want)
			}
		})
	}
}
