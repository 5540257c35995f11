// Package all loads every rule policyd ships. Import it for its side
// effect; its test fails when a rule folder is missing here.
package all

import (
	_ "github.com/policyd-mail/policyd/rules/connection_shaper"
	_ "github.com/policyd-mail/policyd/rules/whitelist"
)
