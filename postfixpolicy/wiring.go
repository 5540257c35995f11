package postfixpolicy

import (
	"strings"
	"sync/atomic"

	"github.com/policyd-mail/policyd/rules"
)

// wiring notices a Postfix set-up that asks policyd at RCPT but never at
// DATA or END-OF-MESSAGE while rules of the chain answer only there:
// client_stats then never counts a delivered message (so
// denysoft_client_stats only gets harsher), spamthrottle never paces.
// It says once, after enough sessions ended, which main.cf line to add.
type wiring struct {
	seen   [stageDataPost + 1]atomic.Bool
	ended  atomic.Int64 // sessions ended that had a RCPT request
	warned [2]atomic.Bool
}

// wiringCheckAfter is how many ended sessions with a RCPT request make
// "never at DATA" a finding: counting ended sessions, not RCPT requests,
// keeps a mailing list's hundred recipients, or a hundred sessions at
// RCPT at once, from looking like a wiring mistake.
const wiringCheckAfter = 100

func (s *Server) noteStage(st stage) {
	s.wiring.seen[st].Store(true)
}

// noteSessionEnd counts a session that ended; hadRcpt: it had a RCPT request.
func (s *Server) noteSessionEnd(hadRcpt bool) {
	w := &s.wiring
	if !hadRcpt || w.ended.Add(1) != int64(s.cfg.WiringCheckAfter) {
		return
	}
	c := s.chain()
	for i, need := range []struct {
		st        stage
		hook      rules.Hook
		state, cf string
	}{
		{stageData, rules.HookData, "DATA", "smtpd_data_restrictions"},
		{stageDataPost, rules.HookDataPost, "END-OF-MESSAGE", "smtpd_end_of_data_restrictions"},
	} {
		if names := c.RulesAt(need.hook); len(names) > 0 && !w.seen[need.st].Load() && !w.warned[i].Swap(true) {
			s.log.Warn("policy sessions reach RCPT but never "+need.state+", where rules of the chain answer: add "+
				need.cf+" = check_policy_service { inet:… } to main.cf (deploy/postfix/main.cf-policy)",
				"rules", strings.Join(names, ","), "sessions", s.cfg.WiringCheckAfter)
		}
	}
}
