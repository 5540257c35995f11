package rules

import (
	"net/netip"
	"sync"
	"time"
)

// Session is one SMTP session as the rules see it, whichever protocol
// carried it. A front-end owns it and runs its hooks one at a time.
type Session struct {
	ID         string // front-end's identifier, for logs
	Protocol   string // "policy" or "milter": for logs and metrics only, never for decisions
	Client     netip.Addr
	ClientPort int
	ClientName string     // reverse name as the MTA verified it, "unknown" or empty
	Local      netip.Addr // the MTA's address the client connected to, when the MTA says
	Helo       string
	AuthUser   string // SASL login, when the MTA reports one
	Started    time.Time

	// Notes live for the whole session (qpsmtpd's connection notes).
	Notes Notes
	// Txn is the current transaction, nil before MAIL and after it ends.
	Txn *Transaction

	// chain pins the chain the session started with, so a reload never
	// changes the rules halfway through a session.
	chain *Chain
	st    sessionState
	// ahead holds the connect hook's reads sent early (readahead.go),
	// for the length of that hook.
	ahead []*readAhead
}

// Transaction is one message: from MAIL to end of message or RSET.
type Transaction struct {
	ID      string // MTA instance or queue id, as far as known
	QueueID string
	Sender  string
	Rcpt    string   // the recipient the rcpt hook is asked about
	Rcpts   []string // recipients accepted so far
	Size    int64
	Notes   Notes
	st      txnState
}

// NewSession is a session on chain c without its driver, for a tool or a
// test that calls a rule's hook itself; front-ends use NewConversation.
func NewSession(c *Chain, protocol string, client netip.Addr, port int, now time.Time) *Session {
	return newSession(c, protocol, client, port, now)
}

func newSession(c *Chain, protocol string, client netip.Addr, port int, now time.Time) *Session {
	return &Session{Protocol: protocol, Client: client.Unmap(), ClientPort: port, Started: now, chain: c}
}

// Chain returns the chain the session runs on.
func (s *Session) Chain() *Chain { return s.chain }

// Begin starts a new transaction, replacing any current one.
func (s *Session) Begin(id string) *Transaction {
	s.Txn = &Transaction{ID: id}
	return s.Txn
}

// Notes is a small string-keyed bag shared by the rules of one session or
// transaction. A session is driven by one goroutine at a time (a milter
// connection's, or whichever policy connection holds the tracker's lock on
// it), and the chain runs hooks and observers in turn, so no two rules
// touch notes at once today. The lock is kept anyway: it costs an
// uncontended lock per note, and a reader outside the chain (a Lua VM's
// goroutine, an admin view of live sessions) stays safe without a review
// of every caller.
type Notes struct {
	mu sync.Mutex
	// A session holds a handful of notes: a short list costs less to
	// make and to search than a map, and every session makes one.
	kv []note
}

type note struct {
	key string
	v   any
}

// Set stores v under key; nil removes it.
func (n *Notes) Set(key string, v any) {
	n.mu.Lock()
	defer n.mu.Unlock()
	for i := range n.kv {
		if n.kv[i].key == key {
			if v == nil {
				n.kv = append(n.kv[:i], n.kv[i+1:]...)
			} else {
				n.kv[i].v = v
			}
			return
		}
	}
	if v == nil {
		return
	}
	if n.kv == nil {
		n.kv = make([]note, 0, 4)
	}
	n.kv = append(n.kv, note{key, v})
}

// Get returns the value under key, or nil.
func (n *Notes) Get(key string) any {
	n.mu.Lock()
	defer n.mu.Unlock()
	for i := range n.kv {
		if n.kv[i].key == key {
			return n.kv[i].v
		}
	}
	return nil
}

// Bool returns the value under key if it is a bool, else false.
func (n *Notes) Bool(key string) bool {
	b, _ := n.Get(key).(bool)
	return b
}

// NoteWhitelisted is the connection note the whitelist rule sets; every
// throttling rule skips a session that carries it.
const NoteWhitelisted = "whitelisted"

// Whitelisted reports whether a whitelist rule vouched for this session.
func (s *Session) Whitelisted() bool { return s.Notes.Bool(NoteWhitelisted) }
