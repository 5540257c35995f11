package badmailfrom

import (
	"fmt"
	"regexp"
	"strings"

	"github.com/policyd-mail/policyd/rules"
)

// List is a set of envelope addresses as qpsmtpd's badmailfrom and
// badrcptto files hold them: whole addresses ("user@example.com") and
// whole domains ("@example.com"), matched case-insensitively, each with an
// optional reason. A domain entry matches that domain only, not its
// subdomains, as in qpsmtpd. badrcptto uses it too.
type List struct {
	entries  map[string]string // "user@dom" or "@dom" -> reason
	patterns []pattern         // in file order, after the entries
}

type pattern struct {
	re     *regexp.Regexp
	text   string
	reason string
}

// patternChars are the characters that make an entry one of qpsmtpd's
// pattern entries (a regular expression matched against the address):
// characters no address holds. '+', '%' and '!' are left out, unlike
// qpsmtpd: "user+tag@example.com" is an address.
const patternChars = "^$*?\\/[](){}|"

// Add parses one entry. The first of two entries for one address keeps
// its reason.
func (l *List) Add(entry, reason string) error {
	if strings.ContainsAny(entry, patternChars) {
		text := strings.Trim(strings.TrimSpace(entry), "/")
		re, err := regexp.Compile("(?i)" + text)
		if err != nil {
			return fmt.Errorf("pattern %q: %v", entry, err)
		}
		l.patterns = append(l.patterns, pattern{re, text, reason})
		return nil
	}
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
	if len(l.entries) == 0 && len(l.patterns) == 0 {
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
	for _, p := range l.patterns {
		if p.re.MatchString(a) {
			return p.text, p.reason, true
		}
	}
	return "", "", false
}

// Len is the number of entries, patterns included.
func (l *List) Len() int { return len(l.entries) + len(l.patterns) }

// Load reads a list from a rule's settings: every key's "entry [reason]"
// values, and the rule file's lines as qpsmtpd writes them ("user@dom",
// "@dom", "user@dom reason", a pattern), each problem at its file:line.
// It warns when nothing was listed at all.
func Load(b *rules.Binder, key, what string) List {
	var l List
	n := 0
	add := func(s rules.Setting, entry, reason string) {
		n++
		if err := l.Add(entry, reason); err != nil {
			b.ErrorAt(s, "%v", err)
		}
	}
	for _, s := range b.Each(key) {
		entry, reason := Entry(s.Value)
		add(s, entry, reason)
	}
	for _, s := range b.Unread() {
		if s.Key == "" { // a bare line: "user@dom"
			entry, reason := Entry(s.Value)
			add(s, entry, reason)
			continue
		}
		add(s, s.Key, s.Value)
	}
	if n == 0 {
		b.Warnf("no %s listed: the rule refuses nothing", what)
	}
	return l
}

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
