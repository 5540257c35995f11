// Package maillog reads a Postfix log and rebuilds the SMTP sessions it
// records, for `policyd replay`: the lines of one smtpd process between
// "connect from" and "disconnect from", the messages it queued (client=,
// then qmgr's from= and the delivery agents' to=) and the recipients it
// refused (reject: RCPT …).
package maillog

import (
	"errors"
	"strconv"
	"strings"
	"time"
)

// Entry is one Postfix log line.
type Entry struct {
	Time    time.Time
	Host    string
	Service string // the daemon: smtpd, qmgr, cleanup, smtp, discard, …
	PID     string
	Msg     string
}

// A Parser reads log lines; it is not safe for concurrent use.
type Parser struct {
	// Year is the year of the first traditional syslog timestamp, which
	// has none; a month going backwards (December to January) adds one.
	Year int
	// Loc is the zone of timestamps without an offset. Default UTC.
	Loc *time.Location

	lastMonth time.Month
}

// ErrNotPostfix is a line of another program: skipped, not counted.
var ErrNotPostfix = errors.New("not a Postfix line")

// MaxLine bounds the lines read; a longer one is not Postfix's.
const MaxLine = 64 << 10

// services are Postfix's daemons and commands: a line is Postfix's when
// its program is NAME/SERVICE with one of them (NAME is the syslog_name:
// postfix, postfix-out, or anything an admin chose).
var services = map[string]bool{}

func init() {
	for _, s := range strings.Fields(`smtpd qmgr oqmgr cleanup smtp lmtp local virtual pipe discard error retry
		bounce defer trace postscreen dnsblog tlsproxy pickup master anvil scache tlsmgr trivial-rewrite
		proxymap proxywrite verify flush showq postlogd postdrop postqueue postsuper sendmail postfix-script postmap`) {
		services[s] = true
	}
}

var months = map[string]time.Month{"Jan": 1, "Feb": 2, "Mar": 3, "Apr": 4, "May": 5, "Jun": 6,
	"Jul": 7, "Aug": 8, "Sep": 9, "Oct": 10, "Nov": 11, "Dec": 12}

// Parse reads one line in any of the forms Postfix's logs take:
//
//	Dec  4 14:07:45 host postfix/smtpd[123]: msg    (syslog)
//	Dec 04 14:07:45 host postfix/smtpd[123]: msg    (maillog_file)
//	2026-12-04T14:07:45.123456+01:00 host postfix/smtpd[123]: msg (RFC 3339)
//
// It returns ErrNotPostfix for another program's line, and another error
// for a line that looks like Postfix's but does not parse.
func (p *Parser) Parse(line string) (Entry, error) {
	var e Entry
	if len(line) > MaxLine {
		return e, errors.New("line too long")
	}
	line = strings.TrimRight(line, "\r\n")
	rest, err := p.timestamp(line, &e)
	if err != nil {
		if looksPostfix(line) {
			return e, err
		}
		return e, ErrNotPostfix
	}
	host, rest, ok := strings.Cut(rest, " ")
	if !ok {
		return e, ErrNotPostfix
	}
	prog, msg, ok := strings.Cut(rest, ": ")
	if !ok {
		if looksPostfix(line) {
			return e, errors.New("no message after the program")
		}
		return e, ErrNotPostfix
	}
	name, pid, ok := strings.Cut(prog, "[")
	if !ok || !strings.HasSuffix(pid, "]") {
		return e, ErrNotPostfix
	}
	i := strings.LastIndexByte(name, '/')
	if i < 0 || !services[name[i+1:]] {
		return e, ErrNotPostfix
	}
	e.Host, e.Service, e.PID, e.Msg = host, name[i+1:], pid[:len(pid)-1], msg
	if _, err := strconv.Atoi(e.PID); err != nil {
		return e, errors.New("bad process id")
	}
	return e, nil
}

func looksPostfix(line string) bool {
	for s := range strings.SplitSeq("/smtpd[ /qmgr[ /cleanup[ /smtp[ /discard[ /local[", " ") {
		if strings.Contains(line, s) {
			return true
		}
	}
	return false
}

func (p *Parser) timestamp(line string, e *Entry) (string, error) {
	loc := p.Loc
	if loc == nil {
		loc = time.UTC
	}
	if len(line) > 0 && line[0] >= '0' && line[0] <= '9' {
		ts, rest, ok := strings.Cut(line, " ")
		if !ok {
			return "", errors.New("no space after the time")
		}
		t, err := time.Parse(time.RFC3339Nano, ts)
		if err != nil {
			t, err = time.ParseInLocation("2006-01-02T15:04:05.999999999", ts, loc)
			if err != nil {
				return "", errors.New("bad RFC 3339 time")
			}
		}
		e.Time = t
		return rest, nil
	}
	// "Mmm dd hh:mm:ss " or "Mmm  d hh:mm:ss ": 16 bytes.
	if len(line) < 16 || line[3] != ' ' || line[6] != ' ' || line[15] != ' ' {
		return "", errors.New("no timestamp")
	}
	mon, ok := months[line[:3]]
	if !ok {
		return "", errors.New("bad month")
	}
	day, err := strconv.Atoi(strings.TrimSpace(line[4:6]))
	if err != nil || day < 1 || day > 31 {
		return "", errors.New("bad day")
	}
	clock, err := time.Parse("15:04:05", line[7:15])
	if err != nil {
		return "", errors.New("bad time of day")
	}
	if p.Year == 0 {
		p.Year = time.Now().Year()
	}
	year := p.Year
	switch {
	case p.lastMonth != 0 && mon < p.lastMonth && p.lastMonth-mon > 6:
		p.Year++ // New Year
		year = p.Year
		p.lastMonth = mon
	case p.lastMonth != 0 && mon > p.lastMonth && mon-p.lastMonth > 6:
		// A late line of the old year after New Year's first ones.
		year--
	default:
		p.lastMonth = mon
	}
	e.Time = time.Date(year, mon, day, clock.Hour(), clock.Minute(), clock.Second(), 0, loc)
	return line[16:], nil
}
