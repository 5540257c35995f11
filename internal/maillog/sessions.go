package maillog

import (
	"errors"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// Session is one SMTP session as the log tells it.
type Session struct {
	ID         string // host/pid/connect time/sequence number: the same for every line of it
	Start, End time.Time
	Client     netip.Addr
	ClientName string
	Helo       string // only when Postfix logged it (reject lines)
	SASL       string
	Messages   []*Message

	key          string
	disconnected bool
}

// Message is one MAIL transaction of a session: queued (QueueID set), or
// refused before anything was queued (NOQUEUE rejects).
type Message struct {
	QueueID string
	Start   time.Time // client= (MAIL), or the first reject
	Sender  string
	Size    int64
	Queued  time.Time // qmgr's from= line: the end of DATA, as near as the log says
	Rcpts   []Rcpt
}

// Rcpt is a recipient: delivered (or attempted) when the MTA took it,
// Refused with the MTA's reply when it did not.
type Rcpt struct {
	Addr    string
	Time    time.Time
	Refused bool
	Reply   string
}

// Rebuilder turns log entries into sessions. Add entries in log order;
// sessions come out in the order they connected, once each is complete:
// disconnected and Grace of log time later (qmgr and the delivery agents
// log a message's sender and recipients after its session may have
// ended). Memory holds the sessions of that span, not the log.
type Rebuilder struct {
	Grace time.Duration

	open  map[string]*Session // host/pid → the session that process serves
	byQID map[string]*Message // host/queue id → its message
	qidOf map[*Message]string
	order []*Session // sessions not yet released, in connect order
	now   time.Time
	seq   int // sessions so far: one process serves many in a second
}

// maxSilence ends a session no line has mentioned for this long: longer
// than any smtpd timeout (smtpd_timeout is 300 s, a DATA phase hours at
// most on a slow link).
const maxSilence = 2 * time.Hour

// NewRebuilder makes a Rebuilder that waits grace after a disconnect.
func NewRebuilder(grace time.Duration) *Rebuilder {
	return &Rebuilder{Grace: grace, open: map[string]*Session{}, byQID: map[string]*Message{}, qidOf: map[*Message]string{}}
}

// Add takes one entry and returns the sessions now complete. An error is a
// line in a known form that does not parse; the entry is ignored.
func (r *Rebuilder) Add(e Entry) ([]*Session, error) {
	if e.Time.After(r.now) {
		r.now = e.Time
	}
	var err error
	switch e.Service {
	case "smtpd":
		err = r.smtpd(e)
	case "qmgr", "oqmgr":
		r.qmgr(e)
	case "smtp", "lmtp", "local", "virtual", "pipe", "discard", "error", "retry":
		r.delivery(e)
	}
	return r.release(false), err
}

// Flush ends the input: every session left comes out.
func (r *Rebuilder) Flush() []*Session { return r.release(true) }

// Oldest is the connect time of the first session still held: every
// session yet to come out connected then or later.
func (r *Rebuilder) Oldest() (time.Time, bool) {
	if len(r.order) == 0 {
		return time.Time{}, false
	}
	return r.order[0].Start, true
}

// Pending is how many sessions are held.
func (r *Rebuilder) Pending() int { return len(r.order) }

func (r *Rebuilder) release(all bool) []*Session {
	n := 0
	for n < len(r.order) {
		s := r.order[n]
		// A session whose disconnect line never came (smtpd crashed,
		// Postfix stopped) must not hold every later one: after
		// maxSilence without a line it is over.
		if !s.disconnected && r.now.Sub(s.End) > maxSilence {
			s.disconnected = true
			delete(r.open, s.key)
		}
		if !all && !(s.disconnected && !r.now.Before(s.End.Add(r.Grace))) {
			break
		}
		if !s.disconnected {
			delete(r.open, s.key)
		}
		for _, m := range s.Messages {
			if q, ok := r.qidOf[m]; ok {
				// A short queue id may already be reused by a newer message.
				if r.byQID[q] == m {
					delete(r.byQID, q)
				}
				delete(r.qidOf, m)
			}
		}
		n++
	}
	if n == 0 {
		return nil
	}
	out := append([]*Session(nil), r.order[:n]...)
	r.order = r.order[n:]
	return out
}

var errForm = errors.New("smtpd line in a known form that does not parse")

// client reads "NAME[IP]" at the start of s.
func client(s string) (name string, a netip.Addr, rest string, ok bool) {
	i := strings.IndexByte(s, '[')
	j := strings.IndexByte(s, ']')
	if i <= 0 || j < i {
		return "", a, "", false
	}
	a, err := netip.ParseAddr(strings.TrimPrefix(s[i+1:j], "IPv6:"))
	if err != nil {
		return "", a, "", false
	}
	return s[:i], a.Unmap(), s[j+1:], true
}

func (r *Rebuilder) smtpd(e Entry) error {
	key := e.Host + "/" + e.PID
	m := e.Msg
	switch {
	case strings.HasPrefix(m, "connect from "):
		name, a, _, ok := client(m[len("connect from "):])
		if !ok {
			return errForm
		}
		if old := r.open[key]; old != nil {
			old.disconnected = true // its disconnect line was lost
		}
		r.seq++
		s := &Session{ID: e.Host + "/" + e.PID + "/" + e.Time.UTC().Format("20060102T150405") + "/" + strconv.Itoa(r.seq), Start: e.Time, End: e.Time,
			Client: a, ClientName: name, key: key}
		r.open[key] = s
		r.order = append(r.order, s)
		return nil
	case strings.HasPrefix(m, "disconnect from "):
		if s := r.open[key]; s != nil {
			s.End, s.disconnected = e.Time, true
			delete(r.open, key)
		}
		return nil
	}
	s := r.open[key]
	if s == nil {
		return nil // a session that began before the log
	}
	s.End = e.Time
	qid, rest, ok := strings.Cut(m, ": ")
	if !ok {
		return nil
	}
	switch {
	case strings.HasPrefix(rest, "client="):
		msg := &Message{QueueID: qid, Start: e.Time}
		s.Messages = append(s.Messages, msg)
		r.byQID[e.Host+"/"+qid] = msg
		r.qidOf[msg] = e.Host + "/" + qid
		if _, sasl, ok := strings.Cut(rest, "sasl_username="); ok {
			s.SASL, _, _ = strings.Cut(sasl, ",")
		}
	case strings.HasPrefix(rest, "reject: RCPT from "):
		return r.reject(s, e, qid, rest)
	}
	return nil
}

// reject reads "reject: RCPT from NAME[IP]: REPLY; from=<s> to=<r> proto=P helo=<h>".
func (r *Rebuilder) reject(s *Session, e Entry, qid, rest string) error {
	i := strings.LastIndex(rest, "; from=<")
	if i < 0 {
		return errForm
	}
	head, tail := rest[:i], rest[i+2:]
	_, _, reply, ok := client(head[len("reject: RCPT from "):])
	if !ok {
		return errForm
	}
	reply = strings.TrimPrefix(reply, ": ")
	from, ok1 := field(tail, "from=<")
	to, ok2 := field(tail, "to=<")
	if !ok1 || !ok2 {
		return errForm
	}
	if h, ok := field(tail, "helo=<"); ok {
		s.Helo = h
	}
	var msg *Message
	if qid != "NOQUEUE" {
		msg = r.byQID[e.Host+"/"+qid]
	}
	if msg == nil {
		// Refused before a queue file: the open NOQUEUE message of this
		// sender, or a new one.
		if n := len(s.Messages); n > 0 && s.Messages[n-1].QueueID == "" && s.Messages[n-1].Sender == from {
			msg = s.Messages[n-1]
		} else {
			msg = &Message{Start: e.Time, Sender: from}
			s.Messages = append(s.Messages, msg)
		}
	}
	msg.Rcpts = append(msg.Rcpts, Rcpt{Addr: to, Time: e.Time, Refused: true, Reply: reply})
	return nil
}

// field reads the value of name<…> in s.
func field(s, name string) (string, bool) {
	i := strings.Index(s, name)
	if i < 0 {
		return "", false
	}
	v := s[i+len(name):]
	j := strings.IndexByte(v, '>')
	if j < 0 {
		return "", false
	}
	return v[:j], true
}

// queued is the message a "QUEUEID: prefix…" line of host e.Host is
// about, with the text after the queue id; nil for another line or a
// message whose session was not seen.
func (r *Rebuilder) queued(e Entry, prefix string) (*Message, string) {
	qid, rest, ok := strings.Cut(e.Msg, ": ")
	if !ok || !strings.HasPrefix(rest, prefix) {
		return nil, ""
	}
	return r.byQID[e.Host+"/"+qid], rest
}

func (r *Rebuilder) qmgr(e Entry) {
	msg, rest := r.queued(e, "from=<")
	if msg == nil {
		return
	}
	msg.Sender, _ = field(rest, "from=<")
	if v, ok := strings.CutPrefix(rest[strings.Index(rest, ">")+1:], ", size="); ok {
		n, _, _ := strings.Cut(v, ",")
		msg.Size, _ = strconv.ParseInt(n, 10, 64)
	}
	if msg.Queued.IsZero() {
		msg.Queued = e.Time
	}
}

func (r *Rebuilder) delivery(e Entry) {
	msg, rest := r.queued(e, "to=<")
	if msg == nil {
		return
	}
	to, _ := field(rest, "to=<")
	// An alias expands to several deliveries: the client named orig_to.
	if orig, ok := field(rest, "orig_to=<"); ok {
		to = orig
	}
	for _, rc := range msg.Rcpts {
		if rc.Addr == to && !rc.Refused {
			return // a second attempt at a deferred recipient
		}
	}
	msg.Rcpts = append(msg.Rcpts, Rcpt{Addr: to, Time: msg.Start})
}
