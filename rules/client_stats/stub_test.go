package clientstats_test

import "github.com/policyd-mail/policyd/rules/rulestest"

// The tests make DENY and friends happen with rulestest's stub rule.
func init() { rulestest.RegisterStub() }
