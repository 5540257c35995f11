package badmailfrom_test

import (
	"context"
	"strings"
	"testing"
	"testing/fstest"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/rules/badmailfrom"
	"github.com/policyd-mail/policyd/rules/rulestest"
)

const seedList = `# qpsmtpd's config/badmailfrom, one "sender" line per entry
sender spammer@example.com
sender @spam.example   we do not take mail from spam.example
sender Mixed@Case.Example
`

func TestBadMailFrom(t *testing.T) {
	tests := []struct {
		name    string
		plugins string
		file    string
		sender  string
		rcpts   []string
		want    rules.Code
		text    string
	}{
		{name: "listed address", sender: "spammer@example.com", rcpts: []string{"a@example.test", "b@example.test"},
			want: rules.Deny, text: badmailfrom.DefaultReason},
		{name: "same address in another case, in brackets", sender: "<SPAMMER@Example.Com>",
			want: rules.Deny, text: badmailfrom.DefaultReason},
		{name: "another user of that domain passes", sender: "friend@example.com", want: rules.Declined},
		{name: "listed domain, with its reason", sender: "anyone@spam.example",
			want: rules.Deny, text: "we do not take mail from spam.example"},
		{name: "a subdomain is not the domain", sender: "anyone@mail.spam.example", want: rules.Declined},
		{name: "entries are case-insensitive too", sender: "mixed@case.example", want: rules.Deny},
		{name: "the null sender never matches", sender: "", want: rules.Declined},
		{name: "a sender without a domain never matches", sender: "spammer", want: rules.Declined},
		{name: "plugins-line entry", plugins: `badmailfrom sender @bad.example sender "x@y.example go away"`, file: "-",
			sender: "x@y.example", want: rules.Deny, text: "go away"},
		{name: "first entry for an address keeps its reason", file: "sender a@b.example first\nsender A@B.example second\n",
			sender: "a@b.example", want: rules.Deny, text: "first"},
		{name: "whole address before domain", file: "sender @b.example domain\nsender a@b.example address\n",
			sender: "a@b.example", want: rules.Deny, text: "address"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			plugins, files := "badmailfrom", map[string]string{"badmailfrom": seedList}
			if tc.plugins != "" {
				plugins = tc.plugins
			}
			switch tc.file {
			case "-":
				files = nil
			case "":
			default:
				files["badmailfrom"] = tc.file
			}
			h := rulestest.New(t, plugins, files)
			ctx := context.Background()
			s := h.Session("192.0.2.1")
			s.Connect(ctx)
			// qpsmtpd's way: MAIL passes, every RCPT is refused.
			if d := s.Mail(ctx, rules.MailFrom{Sender: tc.sender}); d.Code != rules.Declined {
				t.Fatalf("mail: %v %q, want DECLINED (the refusal comes at rcpt)", d.Code, d.Text)
			}
			rcpts := tc.rcpts
			if rcpts == nil {
				rcpts = []string{"user@example.test"}
			}
			for _, r := range rcpts {
				d := s.Rcpt(ctx, r)
				if d.Code != tc.want {
					t.Fatalf("rcpt %s: %v %q, want %v", r, d.Code, d.Text, tc.want)
				}
				if tc.text != "" && d.Text != tc.text {
					t.Fatalf("rcpt %s: text %q, want %q", r, d.Text, tc.text)
				}
				if d.Code == rules.Deny && (d.Reply.Code != 550 || d.Reply.Enhanced != "5.7.1" || d.Hook != rules.HookRcpt) {
					t.Fatalf("rcpt %s: reply %q at %v", r, d.Reply, d.Hook)
				}
			}
		})
	}
}

// The note belongs to one transaction: the next MAIL starts clean.
func TestNoteLivesOneTransaction(t *testing.T) {
	h := rulestest.New(t, "badmailfrom", map[string]string{"badmailfrom": seedList})
	ctx := context.Background()
	s := h.Session("192.0.2.1")
	s.Connect(ctx)
	s.Mail(ctx, rules.MailFrom{Sender: "spammer@example.com"})
	if got, _ := s.Txn.Notes.Get(badmailfrom.Note).(string); got != badmailfrom.DefaultReason {
		t.Fatalf("note after MAIL = %q", got)
	}
	if d := s.Rcpt(ctx, "a@example.test"); d.Code != rules.Deny {
		t.Fatalf("rcpt: %v", d.Code)
	}
	s.Mail(ctx, rules.MailFrom{Sender: "friend@example.com"})
	if d := s.Rcpt(ctx, "a@example.test"); d.Code != rules.Declined {
		t.Fatalf("rcpt in the next transaction: %v %q", d.Code, d.Text)
	}
}

func TestConfigErrors(t *testing.T) {
	tests := []struct {
		name, plugins, file string
		want                []string
	}{
		// Errors about an entry name its own file and line (before: plugins:1).
		{name: "not an address", plugins: "badmailfrom", file: "sender postmaster\n",
			want: []string{`config/badmailfrom:1: badmailfrom: sender: "postmaster" is neither an address (user@example.com) nor a domain (@example.com)`}},
		{name: "no domain", plugins: "badmailfrom", file: "sender ok@example.com\nsender user@ reason\n",
			want: []string{`config/badmailfrom:2: badmailfrom: sender: "user@" has no domain after the @`}},
		{name: "a bare entry that is no address", plugins: "badmailfrom", file: "spammer@example.com\nnot-an-address\n",
			want: []string{`config/badmailfrom:2: badmailfrom: "not-an-address" is neither an address (user@example.com) nor a domain (@example.com)`}},
		{name: "a pattern that does not compile", plugins: "badmailfrom", file: "^spam(\n",
			want: []string{"config/badmailfrom:1: badmailfrom: pattern \"^spam(\": error parsing regexp: missing closing ): `(?i)^spam(`"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			fsys := fstest.MapFS{"plugins": {Data: []byte(tc.plugins)}, "badmailfrom": {Data: []byte(tc.file)}}
			_, _, err := rules.Load(fsys, "config", rules.Options{})
			if err == nil {
				t.Fatal("config loads")
			}
			var got []string
			for _, e := range err.(rules.ConfigErrors) {
				got = append(got, e.Error())
			}
			if strings.Join(got, "\n") != strings.Join(tc.want, "\n") {
				t.Fatalf("errors:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(tc.want, "\n"))
			}
		})
	}
}

func TestEmptyListWarns(t *testing.T) {
	h := rulestest.New(t, "badmailfrom", nil)
	if len(h.Warns) != 1 || h.Warns[0].Error() != "config/plugins:1: warning: badmailfrom: no sender listed: the rule refuses nothing" {
		t.Fatalf("warnings: %v", h.Warns)
	}
}

func BenchmarkMailRcpt(b *testing.B) {
	h := rulestest.New(b, "badmailfrom", map[string]string{"badmailfrom": seedList})
	ctx := context.Background()
	s := h.Session("192.0.2.1")
	s.Connect(ctx)
	b.ReportAllocs()
	for b.Loop() {
		s.Mail(ctx, rules.MailFrom{Sender: "friend@example.com"})
		s.Rcpt(ctx, "user@example.test")
	}
}

// qpsmtpd's badmailfrom file as it is: bare entries, entries with a
// reason, domains, and pattern entries. Before, a bare line was a config
// error and a pattern a literal that never matched.
func TestQpsmtpdFileAsItIs(t *testing.T) {
	file := "# qpsmtpd config/badmailfrom\nspammer@example.com\n@junk.example go away\n^bulk-.*@lists\\.example$ no lists\nsender friend@old.example\n"
	h := rulestest.New(t, "badmailfrom", map[string]string{"badmailfrom": file})
	if len(h.Warns) != 0 {
		t.Errorf("warnings: %v", h.Warns)
	}
	ctx := context.Background()
	for _, tc := range []struct {
		sender string
		want   rules.Code
		text   string
	}{
		{"spammer@example.com", rules.Deny, badmailfrom.DefaultReason},
		{"anyone@junk.example", rules.Deny, "go away"},
		{"BULK-news@lists.example", rules.Deny, "no lists"},
		{"bulk-news@lists.example.org", rules.Declined, ""},
		{"friend@old.example", rules.Deny, badmailfrom.DefaultReason},
		{"user+tag@example.com", rules.Declined, ""},
	} {
		s := h.Session("192.0.2.1")
		s.Connect(ctx)
		s.Mail(ctx, rules.MailFrom{Sender: tc.sender})
		if d := s.Rcpt(ctx, "a@example.test"); d.Code != tc.want || tc.text != "" && d.Text != tc.text {
			t.Errorf("%s: %v %q, want %v %q", tc.sender, d.Code, d.Text, tc.want, tc.text)
		}
		s.End(ctx)
	}
}
