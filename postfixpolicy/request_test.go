package postfixpolicy

import (
	"errors"
	"io"
	"strings"
	"testing"
)

func TestReadRequest(t *testing.T) {
	small := Limits{MaxLine: 64, MaxAttrs: 4, MaxRequest: 200}
	tests := []struct {
		name   string
		in     string
		limits Limits
		want   Request
		err    error
	}{
		{name: "full", in: "request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.1\nclient_port=4242\nrecipient=a@b\n\n",
			want: Request{Request: "smtpd_access_policy", ProtocolState: "RCPT", ClientAddress: "192.0.2.1", ClientPort: "4242", Recipient: "a@b", Attrs: 5}},
		{name: "CRLF tolerated", in: "protocol_state=RCPT\r\n\r\n", want: Request{ProtocolState: "RCPT", Attrs: 1}},
		{name: "empty values and = in values", in: "sender=\nhelo_name=a=b\n\n", want: Request{HeloName: "a=b", Attrs: 2}},
		{name: "first of repeated names wins", in: "sender=x@y\nsender=z@w\n\n", want: Request{Sender: "x@y", Attrs: 2}},
		{name: "unknown attributes are counted and ignored", in: "foo=bar\nstress=yes\n\n", want: Request{Attrs: 2}},
		{name: "empty request", in: "\n", want: Request{}},
		{name: "clean EOF between requests", in: "", err: io.EOF},
		{name: "EOF inside a request", in: "sender=x\n", err: ErrTruncated},
		{name: "EOF inside a line", in: "sender=x", err: ErrTruncated},
		{name: "no =", in: "garbage\n\n", err: ErrMalformed},
		{name: "empty name", in: "=value\n\n", err: ErrMalformed},
		{name: "NUL", in: "sender=a\x00b\n\n", err: ErrMalformed},
		{name: "line too long", in: "sender=" + strings.Repeat("x", 100) + "\n\n", limits: small, err: ErrLineTooLong},
		{name: "too many attributes", in: "a=1\nb=2\nc=3\nd=4\ne=5\n\n", limits: small, err: ErrTooManyAttrs},
		{name: "request too big", in: strings.Repeat("a="+strings.Repeat("x", 50)+"\n", 4) + "\n", limits: Limits{MaxLine: 64, MaxAttrs: 100, MaxRequest: 150}, err: ErrRequestTooBig},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			l := tc.limits
			if l.MaxLine == 0 {
				l = DefaultLimits
			}
			var req Request
			err := newReader(strings.NewReader(tc.in), l, nil).read(&req)
			if !errors.Is(err, tc.err) {
				t.Fatalf("err = %v, want %v", err, tc.err)
			}
			if tc.err == nil && req != tc.want {
				t.Fatalf("got %+v\nwant %+v", req, tc.want)
			}
		})
	}
}

// Several requests on one connection are read one after the other.
func TestReadSeveralRequests(t *testing.T) {
	rd := newReader(strings.NewReader("protocol_state=RCPT\n\nprotocol_state=DATA\n\n"), DefaultLimits, nil)
	var req Request
	for _, want := range []string{"RCPT", "DATA"} {
		if err := rd.read(&req); err != nil || req.ProtocolState != want {
			t.Fatalf("got %q, %v; want %s", req.ProtocolState, err, want)
		}
	}
	if err := rd.read(&req); !errors.Is(err, io.EOF) {
		t.Fatalf("after the last request: %v", err)
	}
}

func FuzzReadRequest(f *testing.F) {
	f.Add([]byte("request=smtpd_access_policy\nprotocol_state=RCPT\nclient_address=192.0.2.1\n\n"))
	f.Add([]byte("a=b\n\nc=d\n"))
	f.Add([]byte("\x00\xff=\n\n"))
	f.Fuzz(func(t *testing.T, in []byte) {
		rd := newReader(strings.NewReader(string(in)), Limits{MaxLine: 128, MaxAttrs: 8, MaxRequest: 512}, nil)
		var req Request
		for range 100 {
			if err := rd.read(&req); err != nil {
				return
			}
			if req.Attrs > 8 {
				t.Fatalf("%d attributes accepted over the limit", req.Attrs)
			}
		}
	})
}
