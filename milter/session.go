package milter

import (
	"context"
	"net"
	"net/netip"
	"net/textproto"
	"strconv"
	"sync"
	"time"

	gomilter "github.com/emersion/go-milter"

	"github.com/policyd-mail/policyd/rules"
)

// maxMacros bounds the macros remembered per connection; an MTA sends a
// few dozen, a hostile peer could send millions.
const maxMacros = 256

// session is one milter connection = one SMTP session. go-milter calls
// its methods from the connection's goroutine; close may come from the
// shutdown path, hence the mutex.
type session struct {
	srv  *Server
	conn *conn
	mu   sync.Mutex

	s      *rules.Session
	macros map[string]string
	// sticky is a refusal at connect (for the whole session) or helo
	// (until the next HELO) that every later command gets, as an SMTP
	// server would answer. A connect-stage refusal that does not
	// disconnect is first given at the next command, because Sendmail
	// replaces the text of a connect-stage reply with its own.
	sticky  *rules.Decision
	dataRun bool
	txnOpen bool
	ended   bool
}

var _ gomilter.Milter = (*session)(nil)

func (m *session) merge(mod *gomilter.Modifier) {
	if mod == nil {
		return
	}
	for k, v := range mod.Macros {
		if _, ok := m.macros[k]; !ok && len(m.macros) >= maxMacros {
			continue
		}
		m.macros[k] = v
	}
}

func (m *session) run(h rules.Hook) rules.Decision {
	return m.s.Chain().Run(context.Background(), h, m.s)
}

// answer turns a decision into the milter response, holding the reply for
// the rule's delay (capped within the MTA's timeout for that stage).
func (m *session) answer(d rules.Decision, st stage) (gomilter.Response, error) {
	if d.Delay > 0 {
		limit := m.srv.cfg.MaxCommandDelay
		if st == stageContent {
			limit = m.srv.cfg.MaxContentDelay
		}
		m.srv.hold(min(d.Delay, limit))
	}
	if !d.Refuses() {
		return gomilter.RespContinue, nil
	}
	return response(replyFor(d, st)), nil
}

// Connect starts the session and runs the connect hook.
func (m *session) Connect(host, family string, port uint16, addr net.IP, mod *gomilter.Modifier) (gomilter.Response, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.merge(mod)
	client := clientAddr(addr, m.macros)
	m.s = rules.NewSession(m.srv.chain(), "milter", client, int(port), m.srv.cfg.Clock.Now())
	m.s.ClientName = host
	m.s.ID = strconv.FormatUint(m.conn.id, 10)
	d := m.run(rules.HookConnect)
	if d.Refuses() {
		m.sticky = &d
		if !d.Code.Disconnects() {
			return m.answer(rules.Decision{Delay: d.Delay}, stageConnect)
		}
	}
	return m.answer(d, stageConnect)
}

// clientAddr is the client's IP: from the CONNECT packet, or the
// {client_addr} macro when the MTA reports a non-IP family.
func clientAddr(ip net.IP, macros map[string]string) netip.Addr {
	if a, ok := netip.AddrFromSlice(ip); ok {
		return a.Unmap()
	}
	if a, err := netip.ParseAddr(macros["{client_addr}"]); err == nil {
		return a.Unmap()
	}
	return netip.Addr{}
}

// Helo runs the helo hook, or gives the held connect-stage refusal.
func (m *session) Helo(name string, mod *gomilter.Modifier) (gomilter.Response, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.merge(mod)
	if m.s == nil {
		return gomilter.RespContinue, nil
	}
	m.s.Helo = name
	if m.sticky != nil && m.sticky.Hook == rules.HookConnect {
		return m.giveSticky(stageHelo)
	}
	m.sticky = nil
	d := m.run(rules.HookHelo)
	if d.Refuses() {
		m.sticky = &d
	}
	return m.answer(d, stageHelo)
}

// giveSticky repeats a session refusal, without its delay: the client
// waited once already.
func (m *session) giveSticky(st stage) (gomilter.Response, error) {
	d := *m.sticky
	d.Delay = 0
	return m.answer(d, st)
}

// MailFrom starts a transaction and runs the mail hook.
func (m *session) MailFrom(from string, mod *gomilter.Modifier) (gomilter.Response, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.merge(mod)
	if m.s == nil {
		return gomilter.RespContinue, nil
	}
	if m.txnOpen {
		m.run(rules.HookResetTransaction)
	}
	txn := m.s.Begin(m.macros["i"])
	txn.QueueID = m.macros["i"]
	txn.Sender = from
	m.txnOpen, m.dataRun = true, false
	if u := m.macros["{auth_authen}"]; u != "" {
		m.s.AuthUser = u
	}
	if m.sticky != nil {
		return m.giveSticky(stageEnvelope)
	}
	return m.answer(m.run(rules.HookMail), stageEnvelope)
}

// RcptTo runs the rcpt hook for one recipient.
func (m *session) RcptTo(rcpt string, mod *gomilter.Modifier) (gomilter.Response, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.merge(mod)
	if m.s == nil || m.s.Txn == nil {
		return gomilter.RespContinue, nil
	}
	if m.sticky != nil {
		return m.giveSticky(stageEnvelope)
	}
	if q := m.macros["i"]; q != "" {
		m.s.Txn.QueueID = q
	}
	m.s.Txn.Rcpt = rcpt
	d := m.run(rules.HookRcpt)
	if !d.Refuses() {
		m.s.Txn.Rcpts = append(m.s.Txn.Rcpts, rcpt)
	}
	return m.answer(d, stageEnvelope)
}

// data runs the data hook at the first content event: milter v2 has no
// DATA command, so the first header, end of headers or end of message
// stands for it.
func (m *session) data(mod *gomilter.Modifier) (gomilter.Response, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.merge(mod)
	if m.s == nil || m.s.Txn == nil || m.dataRun {
		return gomilter.RespContinue, nil
	}
	m.dataRun = true
	if q := m.macros["i"]; q != "" {
		m.s.Txn.QueueID = q
	}
	return m.answer(m.run(rules.HookData), stageContent)
}

// Header is the first content event when headers are sent.
func (m *session) Header(_, _ string, mod *gomilter.Modifier) (gomilter.Response, error) {
	return m.data(mod)
}

// Headers (end of headers) is the first content event otherwise.
func (m *session) Headers(_ textproto.MIMEHeader, mod *gomilter.Modifier) (gomilter.Response, error) {
	return m.data(mod)
}

// BodyChunk is not requested (OptNoBody); answer continue if it comes.
func (m *session) BodyChunk(_ []byte, _ *gomilter.Modifier) (gomilter.Response, error) {
	return gomilter.RespContinue, nil
}

// Body is the end of the message: data (if not run yet), then data_post,
// then the transaction ends. It never answers a plain accept, which would
// make go-milter replace this session's handler.
func (m *session) Body(mod *gomilter.Modifier) (gomilter.Response, error) {
	if r, err := m.data(mod); err != nil || r != gomilter.RespContinue {
		return r, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.s == nil || m.s.Txn == nil {
		return gomilter.RespContinue, nil
	}
	d := m.run(rules.HookDataPost)
	m.run(rules.HookResetTransaction)
	m.txnOpen = false
	m.s.Txn = nil
	return m.answer(d, stageContent)
}

// Abort ends the transaction (RSET, a rejected message, or the MTA's
// routine abort after each message).
func (m *session) Abort(_ *gomilter.Modifier) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.txnOpen {
		m.run(rules.HookResetTransaction)
		m.txnOpen = false
	}
	if m.s != nil {
		m.s.Txn = nil
	}
	return nil
}

// end runs when the connection closes, whoever closes it.
func (m *session) end() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.ended {
		return
	}
	m.ended = true
	if m.s == nil {
		return
	}
	if m.txnOpen {
		m.run(rules.HookResetTransaction)
		m.txnOpen = false
	}
	m.run(rules.HookDisconnect)
}

// hold waits d, cut short by shutdown.
func (s *Server) hold(d time.Duration) {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
	case <-s.stop:
	}
}
