// Package all loads every rule policyd ships. Import it for its side
// effect; its test fails when a rule folder is missing here.
package all

import (
	_ "github.com/policyd-mail/policyd/rules/badmailfrom"
	_ "github.com/policyd-mail/policyd/rules/badrcptto"
	_ "github.com/policyd-mail/policyd/rules/client_stats"
	_ "github.com/policyd-mail/policyd/rules/connection_shaper"
	_ "github.com/policyd-mail/policyd/rules/deny_repeat_offenders"
	_ "github.com/policyd-mail/policyd/rules/denysoft_client_stats"
	_ "github.com/policyd-mail/policyd/rules/greylisting"
	_ "github.com/policyd-mail/policyd/rules/hosts_allow"
	_ "github.com/policyd-mail/policyd/rules/luaplugin"
	_ "github.com/policyd-mail/policyd/rules/ratelimit"
	_ "github.com/policyd-mail/policyd/rules/spamthrottle"
	_ "github.com/policyd-mail/policyd/rules/whitelist"
)
