package badrcptto_test

import (
	"context"
	"testing"
	"testing/fstest"

	"github.com/policyd-mail/policyd/rules"
	_ "github.com/policyd-mail/policyd/rules/badrcptto"
	"github.com/policyd-mail/policyd/rules/rulestest"
)

// bareLine is qpsmtpd's badrcptto format, taken as it is.
const bareLine = `trap@example.test
`

func TestBadRcptTo(t *testing.T) {
	file := "recipient abuse-trap@example.com\nrecipient @closed.example this domain is closed\nrecipient Old.User@Example.COM\n"
	tests := []struct {
		rcpt string
		want rules.Code
		text string
	}{
		{"abuse-trap@example.com", rules.Deny, "mail to abuse-trap@example.com not accepted here"},
		{"<ABUSE-TRAP@example.com>", rules.Deny, "mail to abuse-trap@example.com not accepted here"},
		{"someone@example.com", rules.Declined, ""},
		{"anyone@closed.example", rules.Deny, "this domain is closed"},
		{"anyone@sub.closed.example", rules.Declined, ""},
		{"old.user@example.com", rules.Deny, "mail to old.user@example.com not accepted here"},
		{"postmaster", rules.Declined, ""},
	}
	h := rulestest.New(t, "badrcptto", map[string]string{"badrcptto": file})
	ctx := context.Background()
	s := h.Session("192.0.2.1")
	s.Connect(ctx)
	s.Mail(ctx, rules.MailFrom{Sender: "sender@example.org"})
	for _, tc := range tests {
		d := s.Rcpt(ctx, tc.rcpt)
		if d.Code != tc.want || (tc.want != rules.Declined && d.Text != tc.text) {
			t.Errorf("%s: %v %q, want %v %q", tc.rcpt, d.Code, d.Text, tc.want, tc.text)
		}
		if d.Code == rules.Deny && (d.Reply.Code != 550 || d.Reply.Enhanced != "5.7.1") {
			t.Errorf("%s: reply %q", tc.rcpt, d.Reply)
		}
	}
	// A refused recipient does not refuse the transaction.
	if got := s.Txn.Rcpts; len(got) != 3 {
		t.Errorf("accepted recipients %q, want the 3 unlisted ones", got)
	}
}

func TestPluginsLineAndOverride(t *testing.T) {
	h := rulestest.New(t, `badrcptto recipient @trap.example code 554 text "No such user"`, nil)
	ctx := context.Background()
	s := h.Session("192.0.2.1")
	s.Connect(ctx)
	s.Mail(ctx, rules.MailFrom{Sender: "sender@example.org"})
	d := s.Rcpt(ctx, "x@trap.example")
	if d.Code != rules.Deny || d.Reply.String() != "554 5.7.1 No such user" {
		t.Fatalf("%v %q", d.Code, d.Reply)
	}
}

func TestConfigErrors(t *testing.T) {
	fsys := fstest.MapFS{"plugins": {Data: []byte("badrcptto\n")}, "badrcptto": {Data: []byte("recipient nobody\n")}}
	_, _, err := rules.Load(fsys, "config", rules.Options{})
	want := `config/badrcptto:1: badrcptto: recipient: "nobody" is neither an address (user@example.com) nor a domain (@example.com)`
	if err == nil || err.Error() != want {
		t.Fatalf("error %v\nwant %s", err, want)
	}
	// Every entry invalid: the errors, and no "no recipient listed" besides.
	_, warns, err := rules.Load(fsys, "config", rules.Options{})
	if err == nil || len(warns) != 0 {
		t.Fatalf("error %v, warnings %v", err, warns)
	}
	fsys["badrcptto"] = &fstest.MapFile{Data: []byte(bareLine)}
	if _, _, err = rules.Load(fsys, "config", rules.Options{}); err != nil {
		t.Fatalf("qpsmtpd's bare line: %v", err)
	}
}

func BenchmarkRcpt(b *testing.B) {
	h := rulestest.New(b, "badrcptto recipient @closed.example", nil)
	ctx := context.Background()
	s := h.Session("192.0.2.1")
	s.Connect(ctx)
	s.Mail(ctx, rules.MailFrom{Sender: "sender@example.org"})
	b.ReportAllocs()
	for b.Loop() {
		s.Rcpt(ctx, "user@example.test")
		s.Txn.Rcpts = s.Txn.Rcpts[:0]
	}
}
