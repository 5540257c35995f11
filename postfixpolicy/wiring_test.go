package postfixpolicy_test

import (
	"log/slog"
	"strconv"
	"strings"
	"testing"

	"github.com/policyd-mail/policyd/internal/testing/testsync"
	"github.com/policyd-mail/policyd/postfixpolicy"
	_ "github.com/policyd-mail/policyd/rules/client_stats"
	"github.com/policyd-mail/policyd/rules/rulestest"
)

// With client_stats in the chain and Postfix asking only at RCPT (the
// README's block used to lack smtpd_end_of_data_restrictions), the server
// says once which line to add; with END-OF-MESSAGE requests coming, it
// says nothing.
func TestWiringWarning(t *testing.T) {
	for _, tc := range []struct {
		name string
		eom  bool
		want int
	}{
		{"only RCPT", false, 1},
		{"RCPT and END-OF-MESSAGE", true, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var logs testsync.Buffer
			h := rulestest.New(t, "client_stats", nil)
			_, addr := start(t, h, postfixpolicy.Config{WiringCheckAfter: 5, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
			c := dial(t, addr)
			for i := range 12 {
				port := "client_port=" + strconv.Itoa(1000+i)
				c.ask("protocol_state=RCPT", "client_address=192.0.2.40", port, "sender=a@example.org", "recipient=b@example.test", "instance=i"+strconv.Itoa(i))
				if tc.eom {
					c.ask("protocol_state=END-OF-MESSAGE", "client_address=192.0.2.40", port, "sender=a@example.org", "instance=i"+strconv.Itoa(i))
				}
			}
			if n := strings.Count(logs.String(), "add smtpd_end_of_data_restrictions"); n != tc.want {
				t.Errorf("%d warnings, want %d:\n%s", n, tc.want, logs.String())
			}
			if strings.Contains(logs.String(), "smtpd_data_restrictions") {
				t.Errorf("warned about DATA, which no rule of the chain answers at:\n%s", logs.String())
			}
		})
	}
}

// A message to many recipients right after start-up is no wiring mistake:
// sessions that ended are counted, not RCPT requests.
func TestWiringNoWarningForManyRecipients(t *testing.T) {
	var logs testsync.Buffer
	h := rulestest.New(t, "client_stats", nil)
	_, addr := start(t, h, postfixpolicy.Config{WiringCheckAfter: 5, Logger: slog.New(slog.NewTextHandler(&logs, nil))})
	c := dial(t, addr)
	for i := range 20 {
		c.ask("protocol_state=RCPT", "client_address=192.0.2.41", "client_port=2000", "sender=a@example.org", "recipient=b"+strconv.Itoa(i)+"@example.test", "instance=list1")
	}
	c.ask("protocol_state=END-OF-MESSAGE", "client_address=192.0.2.41", "client_port=2000", "sender=a@example.org", "instance=list1")
	if strings.Contains(logs.String(), "smtpd_end_of_data_restrictions") {
		t.Errorf("warned about one message to 20 recipients:\n%s", logs.String())
	}
}
