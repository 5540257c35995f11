package rulestest

import (
	"context"
	"strings"
	"sync"

	"github.com/policyd-mail/policyd/rules"
)

// RegisterStub registers "stub", a test-only rule answering what it is
// told, so a test can make DENY and friends happen where it wants:
//
//	stub rcpt bad@example.test:DENY data_post DENYSOFT
//
// Call it from the test package's init; it registers once.
func RegisterStub() { stubOnce.Do(registerStub) }

var stubOnce sync.Once

var stubCodes = map[string]rules.Code{
	"OK": rules.OK, "DENY": rules.Deny, "DENYSOFT": rules.DenySoft,
	"DENY_DISCONNECT": rules.DenyDisconnect, "DENYSOFT_DISCONNECT": rules.DenySoftDisconnect,
}

type stub struct {
	rcpt     map[string]rules.Code
	dataPost rules.Code
}

func registerStub() {
	rules.Register(rules.Definition{Name: "stub", Setup: func(b *rules.Binder, _ rules.Env) (any, error) {
		s := &stub{rcpt: map[string]rules.Code{}}
		for _, v := range b.Strings("rcpt") {
			addr, code, _ := strings.Cut(v, ":")
			s.rcpt[addr] = stubCodes[code]
		}
		s.dataPost = stubCodes[b.String("data_post", "")]
		return s, nil
	}})
}

func (st *stub) Rcpt(_ context.Context, s *rules.Session) (rules.Result, error) {
	return rules.Decided(st.rcpt[s.Txn.Rcpt], "stub says so"), nil
}

func (st *stub) DataPost(context.Context, *rules.Session) (rules.Result, error) {
	return rules.Decided(st.dataPost, "stub says so"), nil
}
