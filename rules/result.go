// Package rules is policyd's hook engine: qpsmtpd's plugin model without an
// SMTP server. Front-ends turn MTA callbacks into hooks, Chain.Run asks the
// configured rules in order, and the Decision goes back to the front-end,
// which only translates it into the MTA's reply.
package rules

import (
	"fmt"
	"strconv"
	"strings"
	"time"
)

// Hook names a point of the SMTP session, as in qpsmtpd.
type Hook uint8

// The hooks, in the order a session meets them. Deny and OK are observers:
// they run after another hook decided, and their answers are ignored.
const (
	HookConnect Hook = iota
	HookHelo
	HookMail
	HookRcpt
	HookData
	HookDataPost
	HookResetTransaction
	HookDisconnect
	HookDeny
	HookOK
	numHooks
)

var hookNames = [numHooks]string{"connect", "helo", "mail", "rcpt", "data", "data_post", "reset_transaction", "disconnect", "deny", "ok"}

func (h Hook) String() string {
	if h < numHooks {
		return hookNames[h]
	}
	return "hook(" + strconv.Itoa(int(h)) + ")"
}

// Code is a qpsmtpd return code.
type Code uint8

// The qpsmtpd return codes. The zero value is Declined, so an empty Result
// means "no opinion".
const (
	Declined Code = iota
	OK
	Done
	Deny
	DenySoft
	DenyDisconnect
	DenySoftDisconnect
)

var codeNames = [...]string{"DECLINED", "OK", "DONE", "DENY", "DENYSOFT", "DENY_DISCONNECT", "DENYSOFT_DISCONNECT"}

func (c Code) String() string {
	if int(c) < len(codeNames) {
		return codeNames[c]
	}
	return "code(" + strconv.Itoa(int(c)) + ")"
}

// IsDeny reports whether c refuses (the deny observers fire for it).
func (c Code) IsDeny() bool { return c >= Deny }

// Temporary reports whether c is a temporary refusal (4xx).
func (c Code) Temporary() bool { return c == DenySoft || c == DenySoftDisconnect }

// Disconnects reports whether the client is to be hung up on after the reply.
func (c Code) Disconnects() bool { return c == DenyDisconnect || c == DenySoftDisconnect }

// Result is a rule's answer to one hook. Text reaches the SMTP client; keep
// internals out of it (log them instead).
type Result struct {
	Code  Code
	Text  string
	Delay time.Duration // hold the reply this long (teergrubing); the front-end caps it to the MTA's timeout
}

// Decided is shorthand for a rule's verdict.
func Decided(c Code, text string) Result { return Result{Code: c, Text: text} }

// Decision is the outcome of one hook run: the answer and who gave it.
type Decision struct {
	Hook  Hook
	Rule  string // instance name ("connection_shaper:1"); empty when every rule declined
	Code  Code
	Text  string
	Delay time.Duration
	// Reply is the SMTP reply for a refusal (zero for a non-refusal). The
	// engine fills it, with the rule's configured overrides applied.
	Reply Reply
	// DryRun is true when the rule (or the daemon) only pretends: the
	// decision is logged and counted, but the MTA is told to continue.
	DryRun bool
	// Err is set when the answer comes from the store-error or panic policy.
	Err error
}

// Refuses reports whether the MTA must be told to refuse.
func (d Decision) Refuses() bool { return d.Code.IsDeny() && !d.DryRun }

// Reply is an SMTP reply: code, enhanced status code and text.
type Reply struct {
	Code     int    // 450, 550, 421, 521
	Enhanced string // "4.7.1"
	Text     string
	// CodeSet is true when the operator chose Code (the rule's "code"
	// setting), so a front-end keeps it instead of its protocol's default.
	CodeSet bool
}

func (r Reply) String() string {
	if r.Code == 0 {
		return ""
	}
	if r.Enhanced == "" {
		return strconv.Itoa(r.Code) + " " + r.Text
	}
	return fmt.Sprintf("%d %s %s", r.Code, r.Enhanced, r.Text)
}

// MaxReplyText keeps a reply's text inside SMTP's 512-byte line, with
// room for the code and the address context an MTA prepends.
const MaxReplyText = 400

// CleanText is a reply's text as a front-end may send it: on one line (a
// newline would end the reply and desynchronise the protocol) and at most
// MaxReplyText bytes.
func CleanText(s string) string {
	if strings.ContainsAny(s, "\r\n\x00") {
		s = strings.Map(func(r rune) rune {
			if r == '\r' || r == '\n' || r == 0 {
				return ' '
			}
			return r
		}, s)
	}
	if len(s) > MaxReplyText {
		s = s[:MaxReplyText]
	}
	return s
}

// Default texts, used when a rule gives none (qpsmtpd's behaviour).
const (
	defaultDenyText     = "Access denied"
	defaultDenySoftText = "Temporary failure, please try again later"
)

// replyFor maps an answer to the SMTP reply SPEC §3 gives it. Front-ends
// may adjust it to their MTA's quirks (milter at connect/helo).
func replyFor(c Code, text string, o override) Reply {
	var r Reply
	switch c {
	case Deny:
		r = Reply{Code: 550, Enhanced: "5.7.1"}
	case DenySoft:
		r = Reply{Code: 450, Enhanced: "4.7.1"}
	case DenyDisconnect:
		r = Reply{Code: 521, Enhanced: "5.7.1"}
	case DenySoftDisconnect:
		r = Reply{Code: 421, Enhanced: "4.7.0"}
	default:
		return Reply{}
	}
	if o.text != "" {
		text = o.text
	}
	if text == "" {
		if c.Temporary() {
			text = defaultDenySoftText
		} else {
			text = defaultDenyText
		}
	}
	r.Text = text
	// An override only replaces codes of its own class: turning a
	// temporary refusal into a permanent one is a different rule.
	if o.code != 0 && !c.Disconnects() && o.code/100 == r.Code/100 {
		r.Code, r.CodeSet = o.code, true
	}
	if o.enhanced != "" && o.enhanced[0] == byte('0'+r.Code/100) {
		r.Enhanced = o.enhanced
	}
	return r
}
