package postfixpolicy

import (
	"context"
	"strconv"
	"strings"
	"time"

	"github.com/policyd-mail/policyd/rules"
)

// stage is the furthest hook a protocol_state lets us run.
type stage uint8

const (
	stageSession stage = iota // CONNECT, EHLO/HELO, VRFY, ETRN
	stageMail
	stageRcpt
	stageData
	stageDataPost
	stageEnd // protocol_state=DISCONNECT (StateDisconnect): no hook, the session ends
)

func stageOf(state string) (stage, bool) {
	switch state {
	case "CONNECT", "EHLO", "HELO", "VRFY", "ETRN":
		return stageSession, true
	case "MAIL":
		return stageMail, true
	case "RCPT":
		return stageRcpt, true
	case "DATA": // also BDAT
		return stageData, true
	case "END-OF-MESSAGE":
		return stageDataPost, true
	}
	return 0, false
}

// outcome is what a request gets: the deciding decision and the delay to
// hold the reply for (the sum of the delays of every hook it replayed).
type outcome struct {
	d     rules.Decision
	delay time.Duration
}

// add takes one hook's decision and reports whether it refuses.
func (o *outcome) add(d rules.Decision) bool {
	o.delay += d.Delay
	o.d = d
	return d.Refuses()
}

// replay runs, once and in order, the hooks the session has not run yet
// up to the request's stage, through the shared session model; it stops
// at the first refusal. ts.mu is held.
func replay(ctx context.Context, ts *tracked, req *Request, st stage) outcome {
	sig := sigOf(req)
	if sig == ts.prev {
		// The same question twice in a row: answer it again, count once.
		o := ts.prevOut
		o.delay = 0
		return o
	}
	o := replayOnce(ctx, ts, req, st)
	ts.prev, ts.prevOut = sig, o
	return o
}

func replayOnce(ctx context.Context, ts *tracked, req *Request, st stage) outcome {
	s := ts.s
	var o outcome
	if !s.Connected() && o.add(s.Connect(ctx)) {
		return o
	}
	if req.HeloName != "" && !s.HeloRan(req.HeloName) && o.add(s.Helo(ctx, req.HeloName)) {
		return o
	}
	if d, refused := s.Refusal(); refused {
		o.add(d)
		return o
	}
	switch {
	case st == stageSession:
		return o
	case st == stageMail:
		o.add(ts.mail(ctx, req))
		return o
	case req.Instance != "" && req.Instance == ts.lastDone:
		// A late question about a message already finished.
		return o
	}
	if !ts.inTransaction(req) && o.add(ts.mail(ctx, req)) {
		return o
	}
	// The size: at RCPT the client's SIZE= hint (0 without one, which
	// must not hide a size known before), at END-OF-MESSAGE the message's.
	if n, err := strconv.ParseInt(req.Size, 10, 64); err == nil && n > 0 && s.Txn != nil {
		s.Txn.Size = n
	}
	if st == stageRcpt || (!ts.rcptRun && req.Recipient != "") {
		// At DATA and END-OF-MESSAGE Postfix names the recipient only
		// when there is exactly one; it stands for the RCPT we missed.
		ts.rcptRun = true
		if o.add(s.Rcpt(ctx, req.Recipient)) || st == stageRcpt {
			return o
		}
	}
	if st == stageData {
		o.add(s.Data(ctx))
		return o
	}
	o.add(s.DataPost(ctx))
	ts.lastDone, ts.instance = ts.instance, ""
	return o
}

// inTransaction reports whether req belongs to the open transaction. A
// transaction opened by a MAIL request has no instance yet (Postfix sets
// it once MAIL is accepted): the first instance seen is adopted.
func (ts *tracked) inTransaction(req *Request) bool {
	txn := ts.s.Txn
	switch {
	case txn == nil:
		return false
	case ts.instance == req.Instance:
	case ts.instance == "":
		ts.instance, txn.ID = req.Instance, req.Instance
		ts.notePID(req.Instance)
	default:
		return false
	}
	if req.QueueID != "" {
		txn.QueueID = req.QueueID
	}
	return true
}

// mail starts the transaction a request belongs to.
func (ts *tracked) mail(ctx context.Context, req *Request) rules.Decision {
	ts.instance, ts.rcptRun = req.Instance, false
	ts.notePID(req.Instance)
	return ts.s.Mail(ctx, rules.MailFrom{Sender: req.Sender, ID: req.Instance, QueueID: req.QueueID})
}

// startsNewSession recognises a new SMTP session under a key still
// tracked: a CONNECT request for a session already connected (the client
// port was reused), or a message instance from another smtpd process or
// numbered as the first of a session (pre-3.0 Postfix sends no
// client_port, so one policy connection carries many sessions).
func (ts *tracked) startsNewSession(req *Request) bool {
	if !ts.s.Connected() {
		return false
	}
	if req.ProtocolState == "CONNECT" {
		return true
	}
	if req.Instance == "" || req.Instance == ts.instance || req.Instance == ts.lastDone {
		return false
	}
	pid, seq, ok := parseInstance(req.Instance)
	if !ok {
		return false
	}
	if ts.pid != "" && pid != ts.pid {
		return true
	}
	return seq == 0 && (ts.instance != "" || ts.lastDone != "")
}

// notePID remembers which smtpd process serves the session.
func (ts *tracked) notePID(inst string) {
	if pid, _, ok := parseInstance(inst); ok {
		ts.pid = pid
	}
}

// parseInstance splits Postfix's instance, "pid.sec.usec.seqno" in hex,
// where seqno counts the messages of one SMTP session from 0.
func parseInstance(inst string) (pid string, seq uint64, ok bool) {
	parts := strings.Split(inst, ".")
	if len(parts) != 4 {
		return "", 0, false
	}
	seq, err := strconv.ParseUint(parts[3], 16, 64)
	if err != nil {
		return "", 0, false
	}
	return parts[0], seq, true
}

// action turns a decision into the policy reply. Only refusals change
// Postfix's course; everything else is DUNNO, never OK, which would skip
// the MTA's own relay checks.
func action(d rules.Decision) string {
	if !d.Refuses() {
		return "DUNNO"
	}
	r := d.Reply
	r.Text = rules.CleanText(r.Text)
	return r.String()
}
