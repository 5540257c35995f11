package milter

import (
	"strconv"
	"strings"

	gomilter "github.com/emersion/go-milter"

	"github.com/policyd-mail/policyd/rules"
)

// stage tells replyFor where in the SMTP dialogue the answer is given,
// because MTAs treat connect/helo replies differently.
type stage uint8

const (
	stageConnect stage = iota
	stageHelo
	stageEnvelope // MAIL, RCPT
	stageContent  // headers, body, end of message
)

// replyFor turns a refusal into the SMTP reply the MTA is to give
// (SPEC §3): DENYSOFT is 451 behind a milter, not the policy protocol's
// 450; at connect and helo only a 421 makes Postfix hang up, so both
// disconnecting answers become 421 there.
func replyFor(d rules.Decision, st stage) rules.Reply {
	r := d.Reply
	if d.Code == rules.DenySoft && !r.CodeSet {
		r.Code = 451
	}
	if d.Code.Disconnects() && st <= stageHelo {
		r.Code, r.Enhanced = 421, "4.7.0"
	}
	// Postfix rejects a reply whose enhanced code is of another class,
	// and then treats the milter as broken for the whole session.
	class := strconv.Itoa(r.Code / 100)
	if !strings.HasPrefix(r.Enhanced, class+".") {
		r.Enhanced = class + ".7.1"
	}
	return r
}

// response encodes a reply as SMFIR_REPLYCODE. An explicit reply code (not
// a plain reject or tempfail) also keeps go-milter from replacing the
// connection's handler, which would lose the session.
func response(r rules.Reply) *gomilter.CustomResponse {
	return gomilter.NewResponseStr(byte(gomilter.ActReplyCode), strconv.Itoa(r.Code)+" "+r.Enhanced+" "+escapeText(r.Text))
}

// escapeText keeps a text on one line (rules.CleanText) and doubles '%',
// which Sendmail reads as a format and Postfix undoubles.
func escapeText(s string) string {
	s = rules.CleanText(s)
	if !strings.Contains(s, "%") {
		return s
	}
	return strings.ReplaceAll(s, "%", "%%")
}
