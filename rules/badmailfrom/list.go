package badmailfrom

import (
	"fmt"
	"strings"
)

// List is a set of envelope addresses as qpsmtpd's badmailfrom and
// badrcptto files hold them: whole addresses ("user@example.com") and
// whole domains ("@example.com"), matched case-insensitively, each with an
// optional reason. A domain entry matches that domain only, not its
// subdomains, as in qpsmtpd. badrcptto uses it too.
type List struct {
	entries map[string]string // "user@dom" or "@dom" -> reason
}

// Add parses one entry. The first of two entries for one address keeps
// its reason.
func (l *List) Add(entry, reason string) error {
	e := Normalize(entry)
	at := strings.LastIndexByte(e, '@')
	switch {
	case at < 0:
		return fmt.Errorf("%q is neither an address (user@example.com) nor a domain (@example.com)", entry)
	case at == len(e)-1:
		return fmt.Errorf("%q has no domain after the @", entry)
	}
	if l.entries == nil {
		l.entries = make(map[string]string)
	}
	if _, dup := l.entries[e]; !dup {
		l.entries[e] = reason
	}
	return nil
}

// Match looks addr up: the whole address first, then its domain. The null
// sender and addresses without a user or a domain never match.
func (l *List) Match(addr string) (entry, reason string, ok bool) {
	if len(l.entries) == 0 {
		return "", "", false
	}
	a := Normalize(addr)
	at := strings.LastIndexByte(a, '@')
	if at <= 0 || at == len(a)-1 {
		return "", "", false
	}
	if r, ok := l.entries[a]; ok {
		return a, r, true
	}
	if r, ok := l.entries[a[at:]]; ok {
		return a[at:], r, true
	}
	return "", "", false
}

// Len is the number of entries.
func (l *List) Len() int { return len(l.entries) }

// Normalize is the form addresses are compared in: without blanks and
// angle brackets, lower case. The null sender becomes "".
func Normalize(addr string) string {
	a := strings.TrimSpace(addr)
	a = strings.TrimPrefix(a, "<")
	a = strings.TrimSuffix(a, ">")
	return strings.ToLower(strings.TrimSpace(a))
}

// Entry splits a configuration value "address [reason...]".
func Entry(value string) (addr, reason string) {
	v := strings.TrimSpace(value)
	i := strings.IndexAny(v, " \t")
	if i < 0 {
		return v, ""
	}
	return v[:i], strings.TrimSpace(v[i+1:])
}
