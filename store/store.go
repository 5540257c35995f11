// Package store holds the counters and records rules keep between SMTP
// sessions. A Store is shared by every session and every rule, so each
// operation must be atomic on its own: rules never read-modify-write.
package store

import (
	"context"
	"errors"
	"strings"
	"time"
)

// ErrUnavailable is returned (wrapped) when a backend cannot answer right now;
// the engine then applies its fail-open or tempfail policy.
var ErrUnavailable = errors.New("store unavailable")

// Store is the small set of operations every backend offers. Keys are built
// with Key so that a Redis Cluster keeps one client's keys on one slot.
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
	// Delete removes key; deleting a missing key is not an error.
	Delete(ctx context.Context, key string) error
	// Close releases the backend's resources.
	Close() error
}

// Prefix starts every key policyd writes, so a shared Redis can be inspected
// and cleaned by pattern.
const Prefix = "policyd:"

// Key builds "policyd:{<client>}:<rule>:<what>". The braces are a Redis
// Cluster hash tag: every key of one client lands on one slot, so a rule's
// script touching several of them stays in one round trip.
func Key(client, rule, what string) string {
	var b strings.Builder
	b.Grow(len(Prefix) + len(client) + len(rule) + len(what) + 4)
	b.WriteString(Prefix)
	b.WriteByte('{')
	b.WriteString(client)
	b.WriteString("}:")
	b.WriteString(rule)
	b.WriteByte(':')
	b.WriteString(what)
	return b.String()
}
