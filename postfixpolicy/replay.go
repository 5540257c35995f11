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
	stageNone stage = iota // VRFY, ETRN: session hooks only
	stageConnect
	stageHelo
	stageMail
	stageRcpt
	stageData
	stageDataPost
)

func stageOf(state string) (stage, bool) {
	switch state {
	case "CONNECT":
		return stageConnect, true
	case "EHLO", "HELO":
		return stageHelo, true
	case "MAIL":
		return stageMail, true
	case "RCPT":
		return stageRcpt, true
	case "DATA":
		return stageData, true
	case "END-OF-MESSAGE":
		return stageDataPost, true
	case "VRFY", "ETRN":
		return stageNone, true
	}
	return 0, false
}

// outcome is what a request gets: the deciding decision (if any refused)
// and the delay to hold the reply for.
type outcome struct {
	d     rules.Decision
	delay time.Duration
}

func (o *outcome) add(d rules.Decision) bool {
	o.delay += d.Delay
	if d.Refuses() {
		o.d = d
		return true
	}
	if o.d.Code == rules.Declined {
		o.d = d
	}
	return false
}

// replay runs, once and in order, the hooks the session has not run yet up
// to the request's stage. It returns at the first refusal. ts.mu is held.
func replay(ctx context.Context, ts *tracked, req *Request, st stage) outcome {
	s := ts.s
	c := s.Chain()
	var o outcome

	if !ts.connected {
		ts.connected = true
		if d := c.Run(ctx, rules.HookConnect, s); o.add(d) {
			ts.connDeny = &d
			return o
		}
	}
	if ts.connDeny != nil {
		return outcome{d: *ts.connDeny}
	}
	// VRFY and ETRN carry a HELO name too; the helo hook is the last one
	// they can replay.
	if st >= stageHelo || st == stageNone {
		if req.HeloName != "" && req.HeloName != ts.heloRun {
			ts.heloRun = req.HeloName
			s.Helo = req.HeloName
			ts.heloDeny = nil
			if d := c.Run(ctx, rules.HookHelo, s); o.add(d) {
				ts.heloDeny = &d
				return o
			}
		}
		if ts.heloDeny != nil {
			return outcome{d: *ts.heloDeny}
		}
	}
	if st < stageMail {
		return o
	}
	if !ts.txnOpen || req.Instance != ts.instance {
		if ts.txnOpen && !ts.txnDone {
			// A new instance means Postfix finished or aborted the last one.
			c.Run(ctx, rules.HookResetTransaction, s)
		}
		beginTxn(ts, req)
	}
	if ts.txnDone {
		// A late request for a message already past data_post (Postfix
		// asks again only on a retry): nothing left to replay.
		return o
	}
	txn := s.Txn
	if req.QueueID != "" {
		txn.QueueID = req.QueueID
	}
	if !ts.mailRun {
		ts.mailRun = true
		txn.Sender = req.Sender
		if d := c.Run(ctx, rules.HookMail, s); o.add(d) {
			ts.txnDeny = &d
			return o
		}
	}
	if ts.txnDeny != nil {
		return outcome{d: *ts.txnDeny}
	}
	if st == stageRcpt || (st > stageRcpt && ts.rcpts == 0 && req.Recipient != "") {
		if st == stageRcpt && ts.rcpts > 0 && req.Recipient == ts.lastRcpt {
			// The same recipient asked about twice in a row: the policy
			// service sits in two restriction lists. Count it once.
			return outcome{d: ts.lastDec}
		}
		ts.rcpts++
		ts.lastRcpt = req.Recipient
		txn.Rcpt = req.Recipient
		d := c.Run(ctx, rules.HookRcpt, s)
		ts.lastDec = d
		if o.add(d) {
			return o
		}
		txn.Rcpts = append(txn.Rcpts, req.Recipient)
	}
	if st < stageData {
		return o
	}
	if !ts.dataRun {
		ts.dataRun = true
		if n, err := strconv.ParseInt(req.Size, 10, 64); err == nil {
			txn.Size = n
		}
		if d := c.Run(ctx, rules.HookData, s); o.add(d) {
			return o
		}
	}
	if st == stageDataPost {
		if n, err := strconv.ParseInt(req.Size, 10, 64); err == nil {
			txn.Size = n
		}
		d := c.Run(ctx, rules.HookDataPost, s)
		refused := o.add(d)
		ts.txnDone = true
		c.Run(ctx, rules.HookResetTransaction, s)
		if refused {
			return o
		}
	}
	return o
}

func beginTxn(ts *tracked, req *Request) {
	ts.instance = req.Instance
	ts.txnOpen = true
	ts.txnDone = false
	ts.mailRun, ts.dataRun = false, false
	ts.rcpts = 0
	ts.lastRcpt = ""
	ts.txnDeny = nil
	ts.s.Begin(req.Instance)
}

// action turns a decision into the policy reply. Only refusals change
// Postfix's course; everything else is DUNNO, never OK, which would skip
// the MTA's own relay checks.
func action(d rules.Decision) string {
	if !d.Refuses() {
		return "DUNNO"
	}
	r := d.Reply
	r.Text = clean(r.Text)
	return r.String()
}

// maxText keeps a reply inside SMTP's 512-byte line with room for the
// address context Postfix prepends.
const maxText = 400

// clean keeps a rule's text on one line: a newline would end the reply
// and desynchronise the protocol.
func clean(s string) string {
	if strings.ContainsAny(s, "\r\n\x00") {
		s = strings.Map(func(r rune) rune {
			if r == '\r' || r == '\n' || r == 0 {
				return ' '
			}
			return r
		}, s)
	}
	if len(s) > maxText {
		s = s[:maxText]
	}
	return s
}
