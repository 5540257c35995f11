package rules

import (
	"context"
	"net/netip"
	"time"
)

// Conversation drives one SMTP session through the chain: the one session
// model both front-ends share (SPEC §3). Its methods run each hook at the
// point of the SMTP dialogue it belongs to, once, and remember refusals
// the way an SMTP server would answer the client afterwards. A front-end
// only decides which of them an MTA event stands for.
//
// It is the front-ends' type: a rule is given the *Session, which has no
// way back to the Conversation, so no rule can re-enter the chain.
type Conversation struct {
	*Session
}

// NewConversation starts the session of a client that connected at now
// on chain c.
func NewConversation(c *Chain, protocol string, client netip.Addr, port int, now time.Time) *Conversation {
	if c != nil {
		c.opts.Overlap.saw(protocol, client.Unmap(), port, now)
	}
	return &Conversation{Session: newSession(c, protocol, client, port, now)}
}

//
// Sticky refusals: a refused connect holds for the whole session; a
// refused HELO until the next HELO; a refused MAIL for its transaction; a
// refused DATA for the rest of its transaction. A repeated refusal comes
// without the rule's delay: the client waited once already.

// sessionState is the part of Session the conversation methods keep.
type sessionState struct {
	connected bool
	heloRun   bool
	ended     bool
	connDeny  *Decision
	heloDeny  *Decision
}

// txnState is the part of Transaction the conversation methods keep.
type txnState struct {
	mailRun  bool
	dataRun  bool
	mailDeny *Decision
	dataDeny *Decision
}

func repeat(d *Decision) Decision {
	r := *d
	r.Delay = 0
	return r
}

// Connected reports whether the connect hook ran.
func (s *Conversation) Connected() bool { return s.st.connected }

// HeloRan reports whether the helo hook ran for name.
func (s *Conversation) HeloRan(name string) bool { return s.st.heloRun && s.Session.Helo == name }

// Refusal returns the refusal that holds for the session right now
// (connect, then helo), if any.
func (s *Conversation) Refusal() (Decision, bool) {
	switch {
	case s.st.connDeny != nil:
		return repeat(s.st.connDeny), true
	case s.st.heloDeny != nil:
		return repeat(s.st.heloDeny), true
	}
	return Decision{}, false
}

// Connect runs the connect hook, once per session.
func (s *Conversation) Connect(ctx context.Context) Decision {
	if s.st.connected {
		d, _ := s.Refusal()
		return d
	}
	s.st.connected = true
	d := s.chain.Run(ctx, HookConnect, s.Session)
	if d.Refuses() {
		s.st.connDeny = &d
	}
	return d
}

// Helo records the client's HELO name and runs the helo hook for it.
func (s *Conversation) Helo(ctx context.Context, name string) Decision {
	if s.st.connDeny != nil {
		return repeat(s.st.connDeny)
	}
	s.Session.Helo = name
	s.st.heloRun = true
	s.st.heloDeny = nil
	d := s.chain.Run(ctx, HookHelo, s.Session)
	if d.Refuses() {
		s.st.heloDeny = &d
	}
	return d
}

// MailFrom is what the MTA knows of a new transaction.
type MailFrom struct {
	Sender  string
	ID      string // the MTA's message instance, possibly empty
	QueueID string // possibly empty: some MTAs assign it later
}

// Mail ends any open transaction, starts a new one and runs the mail hook.
func (s *Conversation) Mail(ctx context.Context, m MailFrom) Decision {
	s.Reset(ctx)
	txn := s.Begin(m.ID)
	txn.Sender, txn.QueueID = m.Sender, m.QueueID
	if d, refused := s.Refusal(); refused {
		return d
	}
	txn.st.mailRun = true
	d := s.chain.Run(ctx, HookMail, s.Session)
	if d.Refuses() {
		txn.st.mailDeny = &d
	}
	return d
}

// txnRefusal is the refusal that holds for the open transaction.
func (s *Conversation) txnRefusal() (Decision, bool) {
	if d, ok := s.Refusal(); ok {
		return d, true
	}
	if s.Txn != nil && s.Txn.st.mailDeny != nil {
		return repeat(s.Txn.st.mailDeny), true
	}
	return Decision{}, false
}

// Rcpt runs the rcpt hook for one recipient of the open transaction.
func (s *Conversation) Rcpt(ctx context.Context, rcpt string) Decision {
	if s.Txn == nil {
		return Decision{Hook: HookRcpt}
	}
	if d, refused := s.txnRefusal(); refused {
		return d
	}
	s.Txn.Rcpt = rcpt
	d := s.chain.Run(ctx, HookRcpt, s.Session)
	if !d.Refuses() {
		s.Txn.Rcpts = append(s.Txn.Rcpts, rcpt)
	}
	return d
}

// Data runs the data hook, once per transaction.
func (s *Conversation) Data(ctx context.Context) Decision {
	if s.Txn == nil {
		return Decision{Hook: HookData}
	}
	if d, refused := s.txnRefusal(); refused {
		return d
	}
	if s.Txn.st.dataDeny != nil {
		return repeat(s.Txn.st.dataDeny)
	}
	if s.Txn.st.dataRun {
		return Decision{Hook: HookData}
	}
	s.Txn.st.dataRun = true
	d := s.chain.Run(ctx, HookData, s.Session)
	if d.Refuses() {
		s.Txn.st.dataDeny = &d
	}
	return d
}

// DataPost runs data (if it has not run) and data_post at the end of the
// message, then ends the transaction.
func (s *Conversation) DataPost(ctx context.Context) Decision {
	if s.Txn == nil {
		return Decision{Hook: HookDataPost}
	}
	d := s.Data(ctx)
	if !d.Refuses() {
		// A delay the data hook decided here (no DATA event came first)
		// must not be lost: it adds to data_post's.
		dp := s.chain.Run(ctx, HookDataPost, s.Session)
		dp.Delay += d.Delay
		d = dp
	}
	s.Reset(ctx)
	return d
}

// Reset ends the open transaction, if any (RSET, abort, end of message).
func (s *Conversation) Reset(ctx context.Context) {
	if s.Txn == nil {
		return
	}
	if s.Txn.st.mailRun {
		s.chain.Run(ctx, HookResetTransaction, s.Session)
	}
	s.Txn = nil
}

// End closes the session: the open transaction is reset and the
// disconnect hook runs, once.
func (s *Conversation) End(ctx context.Context) {
	if s.st.ended {
		return
	}
	s.st.ended = true
	s.Reset(ctx)
	if s.st.connected {
		s.chain.Run(ctx, HookDisconnect, s.Session)
	}
}
