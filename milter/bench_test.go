package milter_test

import (
	"net"
	"testing"
	"testing/fstest"

	gomilter "github.com/emersion/go-milter"

	"github.com/policyd-mail/policyd/internal/testing/frontendtest"
	"github.com/policyd-mail/policyd/milter"
	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/store/memory"
)

// noop is the baseline: go-milter's NoOpMilter, minus its accept at end
// of message (which would make go-milter rebuild the handler).
type noop struct{ gomilter.NoOpMilter }

func (noop) Body(*gomilter.Modifier) (gomilter.Response, error) { return gomilter.RespContinue, nil }

// fullSession runs what Postfix sends for one message, over its own TCP
// connection: negotiate, connect, helo, mail, rcpt, end of headers, end of
// message, quit.
func fullSession(b *testing.B, addr string, ip string) {
	s := frontendtest.MTA(b, addr)
	s.Macros(gomilter.CodeConn, "j", "mx.example.test", "{daemon_name}", "smtpd", "{daemon_addr}", "192.0.2.1", "v", "Postfix 3.7.11")
	if _, err := s.Conn("client.example.org", gomilter.FamilyInet, 40000, ip); err != nil {
		b.Fatal(err)
	}
	s.Helo("client.example.org")
	s.Macros(gomilter.CodeMail, "i", "4XyZ1234", "{mail_addr}", "alice@example.org")
	s.Mail("<alice@example.org>", nil)
	s.Macros(gomilter.CodeRcpt, "i", "4XyZ1234", "{rcpt_addr}", "bob@example.test")
	s.Rcpt("<bob@example.test>", nil)
	s.HeaderEnd()
	if _, act, err := s.End(); err != nil || act.Code != gomilter.ActContinue {
		b.Fatalf("end of message: %v %v", act, err)
	}
	s.Close()
}

func benchServer(b *testing.B, serve func(net.Listener)) string {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ln.Close() })
	go serve(ln)
	return ln.Addr().String()
}

// BenchmarkMilterSession compares full sessions through policyd's
// milter with the built-in chain against the no-op go-milter server, in
// the same run: report the ratio of the two ns/op.
func BenchmarkMilterSession(b *testing.B) {
	b.Run("noop", func(b *testing.B) {
		addr := benchServer(b, func(ln net.Listener) {
			(&gomilter.Server{NewMilter: func() gomilter.Milter { return noop{} }, Protocol: gomilter.OptNoBody | gomilter.OptNoHeaders}).Serve(ln)
		})
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				fullSession(b, addr, "192.0.2.1")
			}
		})
	})
	b.Run("policyd", func(b *testing.B) {
		st := memory.New(memory.Options{})
		defer st.Close()
		// The built-in chain, with a threshold no benchmark reaches so
		// that every session is fully served.
		c2, _, err := rules.Load(thresholdFS(), "bench", rules.Options{Store: st})
		if err != nil {
			b.Fatal(err)
		}
		srv := milter.New(milter.Config{}, func() *rules.Chain { return c2 })
		addr := benchServer(b, func(ln net.Listener) { srv.Serve(ln) })
		b.RunParallel(func(pb *testing.PB) {
			for pb.Next() {
				fullSession(b, addr, "192.0.2.1")
			}
		})
	})
}

// thresholdFS is the built-in chain with a threshold no benchmark reaches.
func thresholdFS() fstest.MapFS {
	return fstest.MapFS{
		"plugins":   {Data: []byte("whitelist\nconnection_shaper threshold 1000000000\n")},
		"whitelist": {Data: []byte("clients 127.0.0.0/8, ::1/128\n")},
	}
}
