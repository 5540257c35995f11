package main

import (
	"net"
	"net/textproto"
	"slices"
	"sync"
	"testing"
	"time"

	gomilter "github.com/emersion/go-milter"
)

// recording is a milter that logs its callbacks and refuses where told.
type recording struct {
	gomilter.NoOpMilter
	mu     *sync.Mutex
	log    *[]string
	refuse map[string]gomilter.Response
}

func (r recording) note(ev string, m *gomilter.Modifier) gomilter.Response {
	r.mu.Lock()
	*r.log = append(*r.log, ev)
	r.mu.Unlock()
	if resp, ok := r.refuse[ev]; ok {
		return resp
	}
	return gomilter.RespContinue
}

func (r recording) Connect(_, _ string, _ uint16, addr net.IP, m *gomilter.Modifier) (gomilter.Response, error) {
	if m.Macros["{client_addr}"] != addr.String() || m.Macros["j"] == "" {
		return gomilter.RespTempFail, nil
	}
	return r.note("connect", m), nil
}
func (r recording) Helo(string, *gomilter.Modifier) (gomilter.Response, error) {
	return r.note("helo", nil), nil
}
func (r recording) MailFrom(from string, m *gomilter.Modifier) (gomilter.Response, error) {
	if m.Macros["{mail_addr}"] != from || m.Macros["i"] == "" {
		return gomilter.RespTempFail, nil
	}
	return r.note("mail", m), nil
}
func (r recording) RcptTo(rcpt string, m *gomilter.Modifier) (gomilter.Response, error) {
	return r.note("rcpt "+rcpt, m), nil
}
func (r recording) Headers(_ textproto.MIMEHeader, m *gomilter.Modifier) (gomilter.Response, error) {
	return r.note("eoh", m), nil
}
func (r recording) Body(m *gomilter.Modifier) (gomilter.Response, error) {
	return r.note("eom", m), nil
}

func TestPlayMilter(t *testing.T) {
	reply := func(s string) gomilter.Response { return gomilter.NewResponseStr(byte(gomilter.ActReplyCode), s) }
	for _, tc := range []struct {
		name   string
		refuse map[string]gomilter.Response
		final  string
		want   []string
	}{
		{"accepted", nil, "continue", []string{"connect", "helo", "mail", "rcpt r1@x", "rcpt r2@x", "eoh", "eom"}},
		{"one recipient refused", map[string]gomilter.Response{"rcpt r1@x": reply("550 5.7.1 no")}, "550",
			[]string{"connect", "helo", "mail", "rcpt r1@x", "rcpt r2@x", "eoh", "eom"}},
		{"every recipient refused", map[string]gomilter.Response{"rcpt r1@x": reply("451 4.7.1 later"), "rcpt r2@x": reply("451 4.7.1 later")}, "451",
			[]string{"connect", "helo", "mail", "rcpt r1@x", "rcpt r2@x"}},
		{"refused at connect", map[string]gomilter.Response{"connect": reply("421 4.7.0 bye")}, "421", []string{"connect"}},
		{"tempfail at mail", map[string]gomilter.Response{"mail": gomilter.RespTempFail}, "tempfail", []string{"connect", "helo", "mail"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var mu sync.Mutex
			var log []string
			srv := &gomilter.Server{
				NewMilter: func() gomilter.Milter { return recording{mu: &mu, log: &log, refuse: tc.refuse} },
				Protocol:  gomilter.OptNoBody | gomilter.OptNoHeaders,
			}
			ln, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			done := make(chan struct{})
			go func() { srv.Serve(ln); close(done) }()
			defer func() { srv.Close(); <-done }()

			ms, err := milterClient(ln.Addr().String(), 5*time.Second).Session()
			if err != nil {
				t.Fatal(err)
			}
			answered := 0
			final, err := playMilter(testSession("r1@x", "r2@x"), ms, makeBody(100), func(*gomilter.Action) { answered++ })
			if err != nil {
				t.Fatal(err)
			}
			if err := ms.Close(); err != nil {
				t.Fatal(err)
			}
			mu.Lock()
			defer mu.Unlock()
			if final != tc.final {
				t.Errorf("session answer %q, want %q", final, tc.final)
			}
			// The milter's log is complete: every callback was answered
			// before playMilter returned.
			if !slices.Equal(log, tc.want) {
				t.Errorf("milter saw %q\nwant      %q", log, tc.want)
			}
			if answered != len(tc.want) {
				t.Errorf("%d answers counted, want %d", answered, len(tc.want))
			}
		})
	}
}

func TestClassifyMilter(t *testing.T) {
	for _, tc := range []struct {
		a    gomilter.Action
		want string
	}{
		{gomilter.Action{Code: gomilter.ActContinue}, "continue"},
		{gomilter.Action{Code: gomilter.ActAccept}, "accept"},
		{gomilter.Action{Code: gomilter.ActReject}, "reject"},
		{gomilter.Action{Code: gomilter.ActTempFail}, "tempfail"},
		{gomilter.Action{Code: gomilter.ActDiscard}, "discard"},
		{gomilter.Action{Code: gomilter.ActReplyCode, SMTPCode: 451, SMTPText: "4.7.1 later"}, "451"},
	} {
		if got := classifyMilter(&tc.a); got != tc.want {
			t.Errorf("classifyMilter(%c) = %q, want %q", tc.a.Code, got, tc.want)
		}
	}
}

func TestMakeBody(t *testing.T) {
	for _, n := range []int{0, 1, 80, 81, 100000} {
		if got := len(makeBody(n)); got != n {
			t.Errorf("makeBody(%d) has %d bytes", n, got)
		}
	}
}
