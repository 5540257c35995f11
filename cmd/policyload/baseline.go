package main

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"sync"

	gomilter "github.com/emersion/go-milter"
)

// baseline is an in-process server that decides nothing: what the same
// protocol costs on this machine without policyd, for side-by-side runs.
type baseline struct {
	ln   net.Listener
	wg   sync.WaitGroup
	mu   sync.Mutex
	conn map[net.Conn]struct{}
	stop func() error
}

// startBaseline listens on a free loopback port and serves proto there.
func startBaseline(proto string) (*baseline, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("baseline listen: %w", err)
	}
	b := &baseline{ln: ln, conn: map[net.Conn]struct{}{}}
	switch proto {
	case "policy":
		b.stop = ln.Close
		b.wg.Go(b.servePolicy)
	case "milter":
		srv := &gomilter.Server{
			NewMilter: func() gomilter.Milter { return noopMilter{} },
			// What policyd negotiates, so that both get the same
			// packets: no header lines, no body.
			Protocol: gomilter.OptNoBody | gomilter.OptNoHeaders,
		}
		b.stop = srv.Close
		b.wg.Go(func() { srv.Serve(ln) })
	default:
		ln.Close()
		return nil, fmt.Errorf("baseline: unknown protocol %q", proto)
	}
	return b, nil
}

func (b *baseline) addr() string { return b.ln.Addr().String() }

// close stops accepting and, for the policy baseline, cuts the open
// connections (go-milter's server has no way to; its sessions end when
// the load's clients hang up, which they have by then).
func (b *baseline) close() error {
	err := b.stop()
	b.mu.Lock()
	for c := range b.conn {
		c.Close()
	}
	b.mu.Unlock()
	b.wg.Wait()
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

// servePolicy answers every request with DUNNO, reading it line by line
// as any policy server must.
func (b *baseline) servePolicy() {
	for {
		c, err := b.ln.Accept()
		if err != nil {
			return
		}
		b.mu.Lock()
		b.conn[c] = struct{}{}
		b.mu.Unlock()
		b.wg.Go(func() {
			defer func() {
				b.mu.Lock()
				delete(b.conn, c)
				b.mu.Unlock()
				c.Close()
			}()
			br := bufio.NewReaderSize(c, 4096)
			for {
				line, err := br.ReadSlice('\n')
				if err != nil {
					return
				}
				if len(line) == 1 {
					if _, err := c.Write([]byte("action=DUNNO\n\n")); err != nil {
						return
					}
				}
			}
		})
	}
}

// noopMilter is go-milter's NoOpMilter answering continue, not accept, at
// end of message, as policyd does: an accept would make go-milter build a
// new handler for the rest of the connection, a cost policyd never pays.
type noopMilter struct{ gomilter.NoOpMilter }

func (noopMilter) Body(*gomilter.Modifier) (gomilter.Response, error) {
	return gomilter.RespContinue, nil
}
