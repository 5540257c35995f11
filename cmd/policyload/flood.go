package main

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"strings"
	"time"
)

// A flood is a hostile milter client, for the soak's memory figures: it
// negotiates, then sends what policyd never asked for or more of what it
// did, until policyd hangs up or the flood is spent.
//
//   - headers: header packets (policyd negotiates none), 60 kB each, up
//     to floodBytes per connection;
//   - macros: before each of 256 HELO commands a macro packet with a new
//     60 kB macro, for a connection's worth of macro bytes.
//
// Each flood connection is one op; its answer is "dropped" when policyd
// closed it mid-flood, "took-all" when it read everything.
var floods = []string{"headers", "macros"}

// floodBytes bounds what one header-flood connection sends.
const floodBytes = 64 << 20

func milterPacket(cmd byte, data string) []byte {
	b := binary.BigEndian.AppendUint32(make([]byte, 0, 5+len(data)), uint32(len(data)+1))
	return append(append(b, cmd), data...)
}

// negotiation offers protocol version 6 with every action and step.
var negotiation = milterPacket('O', "\x00\x00\x00\x06\x00\x00\x01\xff\x00\x1f\xff\xff")

func floodWorker(cfg *config) worker {
	return func(ctx context.Context, _ *rand.Rand, rec *recorder) {
		for ctx.Err() == nil {
			t0 := time.Now()
			answer, err := floodOnce(ctx, cfg)
			if err != nil {
				if ctx.Err() != nil || errors.Is(err, context.DeadlineExceeded) {
					return
				}
				rec.fail(err)
				retryPause(ctx)
				continue
			}
			rec.lat.add(time.Since(t0))
			rec.ops++
			rec.sessions++
			rec.answers[answer]++
		}
	}
}

func floodOnce(ctx context.Context, cfg *config) (string, error) {
	d := net.Dialer{Timeout: cfg.timeout}
	c, err := d.DialContext(ctx, "tcp", cfg.addr)
	if err != nil {
		// The dialer meets the run's deadline a moment before the
		// context says so: that is the end of the run, not an error.
		if dl, ok := ctx.Deadline(); ok && !time.Now().Before(dl) {
			return "", context.DeadlineExceeded
		}
		return "", fmt.Errorf("flood dial: %w", err)
	}
	defer c.Close()
	stop := context.AfterFunc(ctx, func() { c.SetDeadline(time.Now()) })
	defer stop()
	// Answers are read and thrown away, so policyd never blocks on them.
	go io.Copy(io.Discard, c)
	write := func(b []byte) error {
		c.SetWriteDeadline(time.Now().Add(cfg.timeout))
		_, err := c.Write(b)
		return err
	}
	var packets func(yield func([]byte) bool)
	switch cfg.flood {
	case "headers":
		line := milterPacket('L', "X-Flood\x00"+strings.Repeat("x", 60000)+"\x00")
		packets = func(yield func([]byte) bool) {
			for range floodBytes / len(line) {
				if !yield(line) {
					return
				}
			}
		}
	case "macros":
		value := strings.Repeat("v", 60000)
		helo := milterPacket('H', "helo.example\x00")
		packets = func(yield func([]byte) bool) {
			if !yield(milterPacket('C', "client.example\x004\x00\x0019\x00192.0.2.30\x00")) {
				return
			}
			for i := range 256 {
				if !yield(append(milterPacket('D', fmt.Sprintf("H{m%d}\x00%s\x00", i, value)), helo...)) {
					return
				}
			}
		}
	}
	if err := write(negotiation); err != nil {
		return "", fmt.Errorf("flood negotiate: %w", err)
	}
	for p := range packets {
		if err := write(p); err != nil {
			if ctx.Err() != nil {
				return "", ctx.Err()
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				return "", fmt.Errorf("flood: policyd stopped reading without closing: %w", err)
			}
			return "dropped", nil
		}
	}
	return "took-all", nil
}
