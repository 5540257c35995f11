package postfixpolicy

import (
	"bytes"
	"io/fs"
	"strconv"
	"testing"
	"testing/fstest"
	"time"

	"github.com/policyd-mail/policyd/rules"
	_ "github.com/policyd-mail/policyd/rules/connection_shaper"
	_ "github.com/policyd-mail/policyd/rules/whitelist"
	"github.com/policyd-mail/policyd/store/memory"
)

func loadChain(t testing.TB, files map[string]string) *rules.Chain {
	t.Helper()
	fsys := fstest.MapFS{}
	for n, d := range files {
		fsys[n] = &fstest.MapFile{Data: []byte(d)}
	}
	st := memory.New(memory.Options{})
	t.Cleanup(func() { st.Close() })
	c, _, err := rules.Load(fsys, "bench", rules.Options{Store: st})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func defaultChain(b *testing.B) *rules.Chain {
	st := memory.New(memory.Options{})
	b.Cleanup(func() { st.Close() })
	var fsys fs.FS = rules.DefaultConfig()
	c, _, err := rules.Load(fsys, "bench", rules.Options{Store: st})
	if err != nil {
		b.Fatal(err)
	}
	return c
}

const rcptRequest = "request=smtpd_access_policy\nprotocol_state=RCPT\nprotocol_name=ESMTP\n" +
	"client_address=192.0.2.10\nclient_name=mail.example.org\nreverse_client_name=mail.example.org\n" +
	"client_port=4711\nserver_address=192.0.2.1\nserver_port=25\nhelo_name=mail.example.org\n" +
	"sender=alice@example.org\nrecipient=bob@example.test\nrecipient_count=0\nqueue_id=\n" +
	"instance=12ab.5f3c2d1e.9a8b7.0\nsize=1234\netrn_domain=\nstress=\nsasl_method=\nsasl_username=\n" +
	"ccert_subject=\nccert_issuer=\nccert_fingerprint=\nencryption_protocol=TLSv1.3\n" +
	"encryption_cipher=TLS_AES_256_GCM_SHA384\nencryption_keysize=256\npolicy_context=\n\n"

// One RCPT request of an ongoing session through the front-end: parse,
// find the session, run the rcpt hook, format the answer.
func BenchmarkRcptRequest(b *testing.B) {
	c := defaultChain(b)
	srv := New(Config{}, func() *rules.Chain { return c })
	b.Cleanup(func() { srv.Shutdown(b.Context()) })
	in := bytes.NewReader(nil)
	rd := newReader(in, DefaultLimits, nil)
	reqs := [][]byte{[]byte(rcptRequest), bytes.Replace([]byte(rcptRequest), []byte("bob@"), []byte("eve@"), 1)}
	var req Request
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		in.Reset(reqs[i&1])
		i++
		rd.br.Reset(in)
		if err := rd.read(&req); err != nil {
			b.Fatal(err)
		}
		if act, _ := answerOne(srv, &req); act != "DUNNO" {
			b.Fatal(act)
		}
	}
}

// A new SMTP session per request: connect, helo, mail and rcpt replayed.
func BenchmarkRcptRequestNewSession(b *testing.B) {
	c := defaultChain(b)
	srv := New(Config{}, func() *rules.Chain { return c })
	b.Cleanup(func() { srv.Shutdown(b.Context()) })
	in := bytes.NewReader(nil)
	rd := newReader(in, DefaultLimits, nil)
	var req Request
	b.ReportAllocs()
	i := 0
	for b.Loop() {
		i++
		r := bytes.Replace([]byte(rcptRequest), []byte("client_port=4711"), []byte("client_port="+strconv.Itoa(i)), 1)
		in.Reset(r)
		rd.br.Reset(in)
		if err := rd.read(&req); err != nil {
			b.Fatal(err)
		}
		answerOne(srv, &req)
	}
}

// answerOne answers req as serveConn does, on connection 1.
func answerOne(srv *Server, req *Request) (string, time.Duration) {
	tg, ok := targetOf(req, 1)
	return srv.answerFor(req, tg, ok)
}
