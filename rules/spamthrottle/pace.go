package spamthrottle

import (
	"math/bits"
	"strconv"
	"strings"
	"time"
)

// record is what the store keeps per client: its current pace (the
// delay it has earned) and when the hold of its last message ended.
type record struct {
	pace time.Duration
	free time.Time
}

// next applies the growth and decay law (README, "The law") to a message
// arriving at now with n recipients, and returns the client's new record
// and how long to hold this message.
//
//	first message:           d = st
//	gap = now - free
//	gap <  d (faster):       d = min(2d, stmax)
//	gap >= d (slower):       d = max(st, d / 2^floor(gap/d))
//	hold = min(stmax, d + st*(n-rcpt))    (the recipient term when rcpt > 0 and n > rcpt)
//	free = now + hold
func next(prev record, found bool, now time.Time, p params, n int) (record, time.Duration) {
	if p.st <= 0 {
		return record{free: now}, 0 // st 0: not throttled
	}
	d := p.st
	if found {
		// Settings may have changed since the record was written.
		d = min(max(prev.pace, p.st), p.stmax)
		gap := now.Sub(prev.free)
		if gap < d {
			d = min(2*d, p.stmax)
		} else if k := gap / d; k >= 62 {
			d = p.st
		} else {
			d = max(d>>uint(k), p.st)
		}
	}
	hold := d
	if extra := int64(n) - p.rcpt; p.rcpt > 0 && extra > 0 {
		hold += time.Duration(min(extra, maxRcpt)) * p.st
	}
	hold = min(hold, p.stmax)
	return record{pace: d, free: now.Add(hold)}, hold
}

// ttl keeps a record as long as it can matter: until the client, quiet
// since its hold ended, would be back at st anyway (one halving per
// period of d, at most log2(d/st) of them), with a period to spare.
func (r record) ttl(now time.Time, p params) time.Duration {
	periods := 1
	if p.st > 0 {
		periods += bits.Len64(uint64(r.pace / p.st))
	}
	return max(r.free.Sub(now)+r.pace*time.Duration(periods), time.Second)
}

// encode writes "pace_ms:free_unix_ms".
func (r record) encode() []byte {
	b := strconv.AppendInt(nil, r.pace.Milliseconds(), 10)
	b = append(b, ':')
	return strconv.AppendInt(b, r.free.UnixMilli(), 10)
}

func decode(v []byte) (record, bool) {
	a, b, ok := strings.Cut(string(v), ":")
	if !ok {
		return record{}, false
	}
	pace, err1 := strconv.ParseInt(a, 10, 64)
	free, err2 := strconv.ParseInt(b, 10, 64)
	if err1 != nil || err2 != nil || pace < 0 {
		return record{}, false
	}
	return record{pace: ms(pace), free: time.UnixMilli(free)}, true
}
