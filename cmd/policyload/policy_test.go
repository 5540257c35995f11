package main

import (
	"bufio"
	"errors"
	"math/rand/v2"
	"net/netip"
	"slices"
	"strings"
	"testing"
)

func testSession(rcpts ...string) *session {
	return &session{
		c:    client{addr: netip.MustParseAddr("192.0.2.7"), name: "mail.client.example.net", helo: "mx.client.example.net"},
		port: 40001, pid: 0x1a2b, sec: 0x65000001, usec: 0x3039, tls: true, body: 2048,
		msgs: []message{{sender: "a@client.example.net", rcpts: rcpts}},
	}
}

// attrs decodes a request into its attributes, checking its framing.
func attrs(t *testing.T, req []byte) map[string]string {
	t.Helper()
	s := string(req)
	if !strings.HasSuffix(s, "\n\n") {
		t.Fatalf("request does not end with an empty line: %q", s)
	}
	m := map[string]string{}
	for _, line := range strings.Split(strings.TrimSuffix(s, "\n\n"), "\n") {
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("line %q has no '='", line)
		}
		if _, dup := m[k]; dup {
			t.Fatalf("attribute %s twice", k)
		}
		m[k] = v
	}
	return m
}

func TestAppendRequest(t *testing.T) {
	s := testSession("r1@example.test")
	for _, tc := range []struct {
		r    reqState
		want map[string]string
	}{
		{reqState{state: "CONNECT"}, map[string]string{
			"request": "smtpd_access_policy", "protocol_state": "CONNECT", "protocol_name": "SMTP", "helo_name": "",
			"client_address": "192.0.2.7", "client_name": "mail.client.example.net", "client_port": "40001",
			"instance": "", "queue_id": "", "sender": "", "size": "", "encryption_protocol": "",
		}},
		{reqState{state: "EHLO"}, map[string]string{
			"protocol_state": "EHLO", "protocol_name": "ESMTP", "helo_name": "mx.client.example.net",
			"instance": "", "sender": "", "encryption_protocol": "TLSv1.3",
		}},
		// Postfix names the message (instance, queue_id) once MAIL is accepted.
		{reqState{state: "MAIL"}, map[string]string{
			"protocol_state": "MAIL", "sender": "a@client.example.net", "instance": "", "queue_id": "", "size": "2048", "recipient": "",
		}},
		{reqState{state: "RCPT", rcpt: "r1@example.test"}, map[string]string{
			"protocol_state": "RCPT", "recipient": "r1@example.test", "recipient_count": "0",
			"instance": "1a2b.65000001.3039.0", "queue_id": "00001" + "03039",
		}},
		{reqState{state: "DATA", accepted: 2}, map[string]string{
			"protocol_state": "DATA", "recipient": "", "recipient_count": "2",
		}},
		{reqState{state: "END-OF-MESSAGE", accepted: 1, only: "r1@example.test"}, map[string]string{
			"protocol_state": "END-OF-MESSAGE", "recipient": "r1@example.test", "recipient_count": "1", "size": "2048",
		}},
	} {
		t.Run(tc.r.state, func(t *testing.T) {
			got := attrs(t, s.appendRequest(nil, tc.r))
			if len(got) != 31 {
				t.Errorf("%d attributes, want Postfix 3.7's 31", len(got))
			}
			for k, v := range tc.want {
				if got[k] != v {
					t.Errorf("%s=%q, want %q", k, got[k], v)
				}
			}
		})
	}
}

// script answers a session's requests: the action for each state (DUNNO
// when absent), and records what was asked.
type script struct {
	actions map[string]string // "STATE" or "RCPT rcpt"
	asked   []string
}

func (sc *script) ask(t *testing.T) func([]byte) (string, error) {
	return func(req []byte) (string, error) {
		a := attrs(t, req)
		q := a["protocol_state"]
		if q == "RCPT" {
			q += " " + a["recipient"]
		}
		sc.asked = append(sc.asked, q)
		if act, ok := sc.actions[q]; ok {
			return act, nil
		}
		return "DUNNO", nil
	}
}

func TestPlayPolicy(t *testing.T) {
	all, _ := parseStates("CONNECT,EHLO,MAIL,RCPT,DATA,END-OF-MESSAGE")
	rcptEOM, _ := parseStates("RCPT,END-OF-MESSAGE")
	for _, tc := range []struct {
		name    string
		states  stateSet
		actions map[string]string
		want    []string
	}{
		{"every state", all, nil, []string{"CONNECT", "EHLO", "MAIL", "RCPT r1@x", "RCPT r2@x", "DATA", "END-OF-MESSAGE"}},
		{"recipient and end of data lists only", rcptEOM, nil, []string{"RCPT r1@x", "RCPT r2@x", "END-OF-MESSAGE"}},
		{"refused at connect: the client goes", all, map[string]string{"CONNECT": "450 4.7.1 slow down"}, []string{"CONNECT"}},
		{"refused HELO", all, map[string]string{"EHLO": "REJECT no"}, []string{"CONNECT", "EHLO"}},
		{"refused MAIL: no recipients", all, map[string]string{"MAIL": "DEFER_IF_PERMIT later"}, []string{"CONNECT", "EHLO", "MAIL"}},
		{"one recipient refused", all, map[string]string{"RCPT r1@x": "550 5.7.1 no"}, []string{"CONNECT", "EHLO", "MAIL", "RCPT r1@x", "RCPT r2@x", "DATA", "END-OF-MESSAGE"}},
		{"every recipient refused: no DATA", all, map[string]string{"RCPT r1@x": "550 no", "RCPT r2@x": "450 no"}, []string{"CONNECT", "EHLO", "MAIL", "RCPT r1@x", "RCPT r2@x"}},
		{"421 hangs up", all, map[string]string{"RCPT r1@x": "421 4.7.0 bye"}, []string{"CONNECT", "EHLO", "MAIL", "RCPT r1@x"}},
		{"refused DATA: no end of message", all, map[string]string{"DATA": "450 4.7.1 later"}, []string{"CONNECT", "EHLO", "MAIL", "RCPT r1@x", "RCPT r2@x", "DATA"}},
		{"non-refusing actions go on", all, map[string]string{"CONNECT": "OK", "EHLO": "WARN x", "MAIL": "PREPEND X-A: b"}, []string{"CONNECT", "EHLO", "MAIL", "RCPT r1@x", "RCPT r2@x", "DATA", "END-OF-MESSAGE"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sc := &script{actions: tc.actions}
			if err := playPolicy(testSession("r1@x", "r2@x"), tc.states, sc.ask(t)); err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(sc.asked, tc.want) {
				t.Errorf("asked %q\nwant  %q", sc.asked, tc.want)
			}
		})
	}
}

func TestPlayPolicyOnlyRecipient(t *testing.T) {
	all, _ := parseStates("CONNECT,EHLO,MAIL,RCPT,DATA,END-OF-MESSAGE")
	var eom map[string]string
	err := playPolicy(testSession("r1@x", "r2@x"), all, func(req []byte) (string, error) {
		a := attrs(t, req)
		if a["protocol_state"] == "RCPT" && a["recipient"] == "r2@x" {
			return "450 4.2.0 full", nil
		}
		if a["protocol_state"] == "END-OF-MESSAGE" {
			eom = a
		}
		return "DUNNO", nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// One recipient left: Postfix names it at END-OF-MESSAGE.
	if eom["recipient"] != "r1@x" || eom["recipient_count"] != "1" {
		t.Errorf("END-OF-MESSAGE recipient=%q recipient_count=%q", eom["recipient"], eom["recipient_count"])
	}
}

func TestPlayPolicyError(t *testing.T) {
	all, _ := parseStates("CONNECT,EHLO")
	boom := errors.New("boom")
	n := 0
	err := playPolicy(testSession("r@x"), all, func([]byte) (string, error) { n++; return "", boom })
	if !errors.Is(err, boom) || n != 1 {
		t.Errorf("err %v after %d requests, want boom after 1", err, n)
	}
}

func TestClassifyAction(t *testing.T) {
	for in, want := range map[string]string{
		"DUNNO": "DUNNO", "dunno": "DUNNO", "450 4.7.1 Too many connections": "450",
		"DEFER_IF_PERMIT Service unavailable": "DEFER_IF_PERMIT", "521 5.7.1 bye": "521",
		"REJECT": "REJECT", "PREPEND X-Policy: yes": "PREPEND", "4.7.1": "4.7.1", "": "",
	} {
		if got := classifyAction(in); got != want {
			t.Errorf("classifyAction(%q) = %q, want %q", in, got, want)
		}
	}
	for class, want := range map[string][2]bool{
		"DUNNO": {false, false}, "OK": {false, false}, "450": {true, false}, "421": {true, true},
		"521": {true, true}, "REJECT": {true, false}, "DEFER_IF_PERMIT": {true, false}, "WARN": {false, false},
	} {
		if got := [2]bool{refuses(class), disconnects(class)}; got != want {
			t.Errorf("%s: refuses, disconnects = %v, want %v", class, got, want)
		}
	}
}

func TestReadReply(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		err      bool
	}{
		{"action=DUNNO\n\n", "DUNNO", false},
		{"action=450 4.7.1 later\r\n\r\n", "450 4.7.1 later", false},
		{"foo=bar\naction=REJECT x\n\n", "REJECT x", false},
		{"foo=bar\n\n", "", true},
		{"action=DUNNO\n", "", true},
	} {
		got, err := readReply(bufio.NewReader(strings.NewReader(tc.in)))
		if got != tc.want || (err != nil) != tc.err {
			t.Errorf("readReply(%q) = %q, %v; want %q, error %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}

func TestParseStates(t *testing.T) {
	set, err := parseStates("rcpt, helo,END-OF-MESSAGE")
	if err != nil || !set["RCPT"] || !set["EHLO"] || !set["END-OF-MESSAGE"] || len(set) != 3 {
		t.Errorf("parseStates = %v, %v", set, err)
	}
	if _, err := parseStates("RCPT,QUIT"); err == nil {
		t.Error("QUIT accepted as a state")
	}
}

func TestSessionGen(t *testing.T) {
	pool, err := newClientPool(50, 0)
	if err != nil {
		t.Fatal(err)
	}
	g := &sessionGen{pool: pool, messages: 2, maxRcpts: 3, body: 10, fill: true}
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range 50 {
		s, err := g.make(rng)
		if err != nil {
			t.Fatal(err)
		}
		if s.idx != i || len(s.msgs) != 2 {
			t.Fatalf("session %d: client %d, %d messages", i, s.idx, len(s.msgs))
		}
		for _, m := range s.msgs {
			if n := len(m.rcpts); n < 1 || n > 3 {
				t.Fatalf("%d recipients", n)
			}
		}
		if s.instance(1) == s.instance(0) {
			t.Fatal("two messages share an instance")
		}
	}
	if _, err := g.make(rng); !errors.Is(err, errPoolDone) {
		t.Errorf("after every client: %v, want errPoolDone", err)
	}
}
