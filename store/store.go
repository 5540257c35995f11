// Package store holds the counters and records rules keep between SMTP
// sessions. A Store is shared by every session and every rule, so each
// operation must be atomic on its own: rules never read-modify-write.
package store

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"
)

// ErrUnavailable is returned (wrapped) when a backend cannot answer right now;
// the engine then applies its fail-open or tempfail policy.
var ErrUnavailable = errors.New("store unavailable")

// Store is the set of operations every backend offers. Each is atomic on
// its own and costs one round trip on Redis: rules never read-modify-write
// across calls. Keys are built with Key so that a Redis Cluster keeps one
// client's keys on one slot; the operations taking several keys require
// them to share a hash tag (ErrCrossSlot otherwise, on every backend).
type Store interface {
	// Incr adds delta to the integer at key and returns the new value. A key
	// that does not exist (or has expired) starts at 0 and gets ttl; an
	// existing key keeps its expiry, so a counter is a fixed window anchored
	// at its first hit (qpsmtpd's memcached add+incr). ttl <= 0 means no expiry.
	Incr(ctx context.Context, key string, delta int64, ttl time.Duration) (int64, error)
	// Get returns the value at key and whether it exists.
	Get(ctx context.Context, key string) ([]byte, bool, error)
	// Set stores value at key with ttl (<= 0: no expiry), replacing any value and expiry.
	Set(ctx context.Context, key string, value []byte, ttl time.Duration) error
	// SetNX stores value at key with ttl only if key does not exist. It
	// reports whether it stored, and otherwise returns the current value.
	SetNX(ctx context.Context, key string, value []byte, ttl time.Duration) (stored bool, current []byte, err error)
	// Delete removes keys; deleting a missing key is not an error.
	Delete(ctx context.Context, keys ...string) error

	// HIncr adds to integer fields of hashes (one or more keys under one
	// hash tag) and gives every key it touches the expiry ttl (<= 0: no
	// expiry), so a record lives ttl after its last update.
	HIncr(ctx context.Context, ttl time.Duration, incs ...FieldIncr) error
	// HGet returns the integer fields of each key (one hash tag), nil for
	// a key that does not exist.
	HGet(ctx context.Context, keys ...string) ([]map[string]int64, error)

	// Tally counts one event at now in a record that starts over at 1 when
	// its last event is older than quiet, and expires ttl after its last
	// event (deny_repeat_offenders' "reset after 8 h without one"). It
	// returns the new count. The record is a hash readable with HGet:
	// fields TallyCount and TallyLast (unix milliseconds).
	Tally(ctx context.Context, key string, now time.Time, quiet, ttl time.Duration) (int64, error)

	// Limit takes a request's cost from one or more rate budgets kept as
	// fields of the hash at key (GCRA, see Rate). When every budget with a
	// cost can take it, each does; when one cannot, none does, so a
	// refused request never counts. used holds, per rate, the budget's
	// count with this request's cost: what it made, or would have made.
	// The record expires when its fullest budget is whole again.
	Limit(ctx context.Context, key string, now time.Time, rates ...Rate) (ok bool, used []int64, err error)

	// Acquire takes, or renews, member's lease in the lease set at key if
	// fewer than limit other live leases are held. A lease runs out lease
	// after now, so a crashed holder's slot frees itself. It returns
	// whether the lease was granted and how many live leases the set holds.
	Acquire(ctx context.Context, key, member string, limit int64, now time.Time, lease time.Duration) (granted bool, held int64, err error)
	// Release ends member's lease; releasing a missing lease is not an error.
	Release(ctx context.Context, key, member string) error

	// Scan lists the live keys starting with prefix, for the admin API.
	Scan(ctx context.Context, prefix string) ([]string, error)
	// Inspect describes one key for the admin API; ok is false if it does
	// not exist.
	Inspect(ctx context.Context, key string) (e Entry, ok bool, err error)

	// Close releases the backend's resources.
	Close() error
}

// FieldIncr is one increment of a hash field.
type FieldIncr struct {
	Key   string
	Field string
	Delta int64
}

// Fields of a Tally record.
const (
	TallyCount = "count"
	TallyLast  = "last"
)

// Kind is what a key holds.
type Kind string

// The kinds of value a store holds.
const (
	KindString Kind = "string" // Set/SetNX values and Incr counters
	KindHash   Kind = "hash"   // HIncr and Tally records
	KindLeases Kind = "leases" // Acquire sets: member -> expiry (unix ms)
)

// Entry is one key as the admin API shows it.
type Entry struct {
	Key    string
	Kind   Kind
	Value  []byte           // KindString
	Fields map[string]int64 // KindHash and KindLeases
	TTL    time.Duration    // 0: no expiry
}

// ErrWrongType is returned (wrapped) when an operation meets a key holding
// another kind of value (Redis's WRONGTYPE).
var ErrWrongType = errors.New("key holds another kind of value")

// ErrCrossSlot is returned (wrapped) when the keys of one operation do not
// share a hash tag (Redis Cluster's CROSSSLOT): such an operation could
// not be one round trip on a Cluster.
var ErrCrossSlot = errors.New("keys do not share a hash tag")

// HashTag is the part of key Redis Cluster hashes: the content of the
// first {...} with something in it, else the whole key.
func HashTag(key string) string {
	if i := strings.IndexByte(key, '{'); i >= 0 {
		if j := strings.IndexByte(key[i+1:], '}'); j > 0 {
			return key[i+1 : i+1+j]
		}
	}
	return key
}

// SameTag checks that keys share one hash tag.
func SameTag(keys ...string) error {
	for i := 1; i < len(keys); i++ {
		if HashTag(keys[i]) != HashTag(keys[0]) {
			return fmt.Errorf("%w: %s and %s", ErrCrossSlot, keys[0], keys[i])
		}
	}
	return nil
}
