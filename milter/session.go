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

// maxMacroBytes bounds the bytes of the macros a connection remembers
// (names and values). Postfix sends a few hundred bytes of them, Sendmail
// a few KiB; MaxMacros bounds their number. Without it a peer could park
// MaxMacros values of a packet's size each, megabytes per connection.
const maxMacroBytes = 64 << 10

// session is one milter connection = one SMTP session. go-milter calls
// its methods from the connection's goroutine; end may come from the
// shutdown path, hence the mutex. The session model (hooks once, in
// order, sticky refusals, transactions) is the rules package's; this
// type only maps milter events onto it.
type session struct {
	srv    *Server
	conn   *conn
	mu     sync.Mutex
	s      *rules.Conversation
	macros map[string]string
	// macroBytes is the size of macros' names and values.
	macroBytes int
}

var _ gomilter.Milter = (*session)(nil)

// inTransaction reports whether a transaction is open (MAIL seen, not
// yet ended).
func (m *session) inTransaction() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.s != nil && m.s.Txn != nil
}

func (m *session) merge(mod *gomilter.Modifier) {
	if mod == nil {
		return
	}
	for k, v := range mod.Macros {
		old, ok := m.macros[k]
		grow := len(v) - len(old)
		if !ok {
			grow += len(k)
		}
		if !ok && len(m.macros) >= m.srv.cfg.MaxMacros || m.macroBytes+grow > maxMacroBytes {
			continue
		}
		m.macros[k] = v
		m.macroBytes += grow
	}
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

// Connect starts the session and runs the connect hook. A refusal that
// does not disconnect is given at the next command instead (the session
// model repeats it there): Sendmail would replace its text with its own.
func (m *session) Connect(host, family string, port uint16, addr net.IP, mod *gomilter.Modifier) (gomilter.Response, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.merge(mod)
	m.s = rules.NewConversation(m.srv.chain(), "milter", clientAddr(addr, m.macros), int(port), m.srv.cfg.Clock.Now())
	m.s.ClientName = host
	m.s.Local = localAddr(m.macros)
	m.s.ID = strconv.FormatUint(m.conn.ID, 10)
	d := m.s.Connect(context.Background())
	if d.Refuses() && !d.Code.Disconnects() {
		return m.answer(rules.Decision{Delay: d.Delay}, stageConnect)
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

// localAddr is the MTA's own address of the connection: Postfix's
// {daemon_addr}, Sendmail's {if_addr}.
func localAddr(macros map[string]string) netip.Addr {
	for _, k := range []string{"{daemon_addr}", "{if_addr}"} {
		if a, err := netip.ParseAddr(macros[k]); err == nil {
			return a.Unmap()
		}
	}
	return netip.Addr{}
}

// Helo runs the helo hook (or repeats the connect refusal).
func (m *session) Helo(name string, mod *gomilter.Modifier) (gomilter.Response, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.merge(mod)
	if m.s == nil {
		return gomilter.RespContinue, nil
	}
	return m.answer(m.s.Helo(context.Background(), name), stageHelo)
}

// MailFrom starts a transaction and runs the mail hook.
func (m *session) MailFrom(from string, mod *gomilter.Modifier) (gomilter.Response, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.merge(mod)
	if m.s == nil {
		return gomilter.RespContinue, nil
	}
	if u := m.macros["{auth_authen}"]; u != "" {
		m.s.AuthUser = u
	}
	qid := m.macros["i"]
	d := m.s.Mail(context.Background(), rules.MailFrom{Sender: from, ID: qid, QueueID: qid})
	if m.s.Txn != nil {
		// The client's SIZE= hint: what the rules know of the size
		// behind milter, which never negotiates the body.
		m.s.Txn.Size = m.conn.mailSize.Load()
	}
	return m.answer(d, stageEnvelope)
}

// queueID refreshes the queue id: Postfix may send it only at a later
// stage than MAIL.
func (m *session) queueID() {
	if q := m.macros["i"]; q != "" && m.s.Txn != nil {
		m.s.Txn.QueueID = q
	}
}

// RcptTo runs the rcpt hook for one recipient.
func (m *session) RcptTo(rcpt string, mod *gomilter.Modifier) (gomilter.Response, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.merge(mod)
	if m.s == nil {
		return gomilter.RespContinue, nil
	}
	m.queueID()
	return m.answer(m.s.Rcpt(context.Background(), rcpt), stageEnvelope)
}

// data runs the data hook at the first content event: milter v2 has no
// DATA command, so the first header, end of headers or end of message
// stands for it.
func (m *session) data(mod *gomilter.Modifier) (gomilter.Response, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.merge(mod)
	if m.s == nil {
		return gomilter.RespContinue, nil
	}
	m.queueID()
	return m.answer(m.s.Data(context.Background()), stageContent)
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

// Body is the end of the message: data if it has not run, data_post, and
// the end of the transaction. It never answers a plain accept, which
// would make go-milter replace this session's handler.
func (m *session) Body(mod *gomilter.Modifier) (gomilter.Response, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.merge(mod)
	if m.s == nil {
		return gomilter.RespContinue, nil
	}
	m.queueID()
	return m.answer(m.s.DataPost(context.Background()), stageContent)
}

// Abort ends the transaction (RSET, a rejected message, or the MTA's
// routine abort after each message).
func (m *session) Abort(_ *gomilter.Modifier) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.s != nil {
		m.s.Reset(context.Background())
	}
	return nil
}

// end runs when the connection closes, whoever closes it.
func (m *session) end() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.s != nil {
		m.s.End(context.Background())
	}
}

// hold waits d, cut short by shutdown.
func (s *Server) hold(d time.Duration) { s.gate.Hold(d) }
