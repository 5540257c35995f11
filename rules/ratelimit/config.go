package ratelimit

import (
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/policyd-mail/policyd/store"
)

// What a budget counts. The names are the config keys and the fields of
// the store record.
const (
	Messages   = "messages"
	Recipients = "recipients"
	Bytes      = "bytes"
)

// kinds in the order a store call lists them.
var kinds = []string{Messages, Recipients, Bytes}

// budget is one "N/DURATION" of a kind; limit 0 with unlimited set lifts
// the kind (an override's "messages unlimited").
type budget struct {
	kind      string
	limit     int64
	period    time.Duration
	written   string // the window as the admin wrote it, for the reply
	unlimited bool
}

// budgets holds at most one budget per kind, indexed like kinds.
type budgets [3]*budget

func kindIndex(kind string) int {
	for i, k := range kinds {
		if k == kind {
			return i
		}
	}
	return -1
}

// any tells whether some kind is limited.
func (bs budgets) any() bool {
	for _, b := range bs {
		if b != nil && !b.unlimited {
			return true
		}
	}
	return false
}

// with is bs with the kinds o names replaced (an override).
func (bs budgets) with(o budgets) budgets {
	for i, b := range o {
		if b != nil {
			bs[i] = b
		}
	}
	return bs
}

// parseBudget reads "100/1h", "50M/1d" or "unlimited" for kind.
func parseBudget(kind, v string) (*budget, error) {
	if v == "unlimited" {
		return &budget{kind: kind, unlimited: true}, nil
	}
	n, window, ok := strings.Cut(v, "/")
	if !ok {
		return nil, fmt.Errorf("%s: %q is not N/DURATION (like 100/1h) or unlimited", kind, v)
	}
	var limit int64
	var err error
	if kind == Bytes {
		limit, err = parseSize(n)
	} else {
		limit, err = strconv.ParseInt(n, 10, 64)
		if err != nil || limit < 1 {
			err = fmt.Errorf("%q is not a count of 1 or more", n)
		}
	}
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", kind, v, err)
	}
	period, err := parseWindow(window)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", kind, v, err)
	}
	return &budget{kind: kind, limit: limit, period: period, written: window}, nil
}

// parseSize reads a byte count with an optional K, M or G (powers of
// 1024, as Postfix's message_size_limit is usually reasoned about).
func parseSize(s string) (int64, error) {
	mult := int64(1)
	switch strings.ToUpper(s[len(s)-min(1, len(s)):]) {
	case "K":
		mult = 1 << 10
	case "M":
		mult = 1 << 20
	case "G":
		mult = 1 << 30
	}
	digits := s
	if mult > 1 {
		digits = s[:len(s)-1]
	}
	n, err := strconv.ParseInt(digits, 10, 64)
	if err != nil || n < 1 || n > (1<<50)/mult {
		return 0, fmt.Errorf("%q is not a size (bytes, or with K, M or G, like 50M)", s)
	}
	return n * mult, nil
}

// parseWindow reads a window: Go's durations (90s, 1h30m), plus d and w.
func parseWindow(s string) (time.Duration, error) {
	var d time.Duration
	var err error
	switch {
	case strings.HasSuffix(s, "d") || strings.HasSuffix(s, "w"):
		unit := 24 * time.Hour
		if strings.HasSuffix(s, "w") {
			unit *= 7
		}
		var n int64
		n, err = strconv.ParseInt(s[:len(s)-1], 10, 64)
		if err == nil && (n < 1 || n > 366) {
			err = fmt.Errorf("out of range")
		}
		d = time.Duration(n) * unit
	default:
		d, err = time.ParseDuration(s)
	}
	if err != nil || d < time.Second || d > 366*24*time.Hour {
		return 0, fmt.Errorf("window %q is not a duration from 1s to 366d (like 90s, 1h, 1d, 1w)", s)
	}
	return d, nil
}

// rates is the store call for costs (indexed like kinds) under bs.
func (bs budgets) rates(costs [3]int64) ([]store.Rate, []*budget) {
	rs := make([]store.Rate, 0, len(kinds))
	which := make([]*budget, 0, len(kinds))
	for i, b := range bs {
		if b == nil || b.unlimited {
			continue
		}
		rs = append(rs, store.Rate{Field: b.kind, Limit: b.limit, Period: b.period, Cost: costs[i]})
		which = append(which, b)
	}
	return rs, which
}
