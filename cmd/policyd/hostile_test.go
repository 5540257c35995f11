package main

// Hostile clients against the real binary over real sockets (SPEC §8):
// whatever they send or hold, the daemon drops them, keeps answering the
// MTA, stays small, and gives back every goroutine they cost.

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	gomilter "github.com/emersion/go-milter"

	"github.com/policyd-mail/policyd/internal/testing/frontendtest"
	"github.com/policyd-mail/policyd/milter"
	"github.com/policyd-mail/policyd/postfixpolicy"
)

// maxRSS is what the daemon may grow to under the hostile load, peak
// included. The test binary is built with -race, whose shadow memory
// counts in it, so a plain build stays well below.
const maxRSS = 200 << 20

// metricValue returns the value of the sample whose name and labels are
// exactly series (e.g. `go_goroutines`), or -1 when /metrics lacks it.
func metricValue(t testing.TB, d *proc, series string) float64 {
	t.Helper()
	// A new connection per scrape: a kept-alive one would hold a daemon
	// goroutine between scrapes and blur the goroutine count.
	c := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + d.http + "/metrics")
	if err != nil {
		t.Fatalf("scraping /metrics: %v", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET /metrics: %d %v", resp.StatusCode, err)
	}
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(series) + ` (\S+)$`).FindSubmatch(body)
	if m == nil {
		return -1
	}
	v, err := strconv.ParseFloat(string(m[1]), 64)
	if err != nil {
		t.Fatalf("%s: %v", series, err)
	}
	return v
}

// pollMetric waits until ok accepts series' value, for up to 30s, and
// returns the last value seen.
func pollMetric(t testing.TB, d *proc, series string, ok func(float64) bool) float64 {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	// Each scrape costs the daemon a connection and a goroutine: poll at
	// an interval rather than in a tight loop.
	tick := time.NewTicker(50 * time.Millisecond)
	defer tick.Stop()
	for {
		v := metricValue(t, d, series)
		if ok(v) {
			return v
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s stayed at %v for 30s", series, v)
		}
		<-tick.C
	}
}

// procStatus reads a "kB" field (VmRSS, VmHWM) of /proc/<pid>/status.
func procStatus(t testing.TB, pid int, field string) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatalf("reading the daemon's memory: %v", err)
	}
	m := regexp.MustCompile(`(?m)^` + field + `:\s+(\d+) kB$`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("/proc/%d/status has no %s:\n%s", pid, field, b)
	}
	kb, _ := strconv.ParseInt(string(m[1]), 10, 64)
	return kb << 10
}

// droppedByDaemon fails unless the daemon closes c within 10s; whatever
// it wrote before closing is returned.
func droppedByDaemon(t testing.TB, c net.Conn) []byte {
	t.Helper()
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	var got bytes.Buffer
	_, err := io.Copy(&got, c)
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("the daemon kept a hostile connection open for 10s")
	}
	return got.Bytes()
}

// milterSession plays one complete SMTP session as an MTA would, and
// fails unless every step is answered "continue" within the client's
// 10s timeouts.
func milterSession(t testing.TB, addr, ip string) {
	t.Helper()
	s := frontendtest.MTA(t, addr)
	defer s.Close()
	step := func(name string, a *gomilter.Action, err error) {
		t.Helper()
		if err != nil || a.Code != gomilter.ActContinue {
			t.Fatalf("milter %s: %+v %v", name, a, err)
		}
	}
	s.Macros(gomilter.CodeConn, "j", "mx.example.test", "{daemon_name}", "smtpd")
	a, err := s.Conn("client.example", gomilter.FamilyInet, 40000, ip)
	step("connect", a, err)
	a, err = s.Helo("client.example")
	step("helo", a, err)
	s.Macros(gomilter.CodeMail, "i", "4XyZ1234")
	a, err = s.Mail("<s@example.org>", nil)
	step("mail", a, err)
	a, err = s.Rcpt("<r@example.test>", nil)
	step("rcpt", a, err)
	a, err = s.HeaderEnd()
	step("end of headers", a, err)
	_, a, err = s.End()
	step("end of message", a, err)
}

func randomBytes(seed uint64, n int) []byte {
	rng := rand.New(rand.NewPCG(seed, seed+1))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.UintN(256))
	}
	return b
}

func TestHostileClients(t *testing.T) {
	const idle = 200
	d := startDaemon(t, "--milter-listen", "127.0.0.1:0")
	pid := d.cmd.Process.Pid
	policyOK := func(port string) {
		t.Helper()
		c, err := net.Dial("tcp", d.policy)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if got := policyAsk(t, c, bufio.NewReader(c), "protocol_state=RCPT", "client_address=192.0.2.20", "client_port="+port, "recipient=r@example.test"); got != "action=DUNNO" {
			t.Fatalf("a correct policy request got %q", got)
		}
	}
	// Both front-ends have served once, so the baseline holds whatever
	// they keep for good.
	policyOK("1")
	milterSession(t, d.milter, "192.0.2.21")
	// The warm-up's own goroutines end just after their replies: the
	// baseline is the count once two scrapes in a row agree.
	last := -1.0
	baseline := pollMetric(t, d, "go_goroutines", func(v float64) bool { settled := v == last; last = v; return settled })
	rssBefore := procStatus(t, pid, "VmRSS")

	// Idle connections on both listeners, held open to the end.
	var held []net.Conn
	defer func() {
		for _, c := range held {
			c.Close()
		}
	}()
	for _, addr := range []string{d.policy, d.milter} {
		for range idle {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatalf("idle connection %d: %v", len(held), err)
			}
			held = append(held, c)
		}
	}
	pollMetric(t, d, `policyd_sessions_open{protocol="milter"}`, func(v float64) bool { return v == idle })
	// One goroutine per connection: every idle one was accepted and is
	// being waited on.
	peak := pollMetric(t, d, "go_goroutines", func(v float64) bool { return v >= baseline+2*idle })

	// Hostile input, each on its own connection, all at once.
	type hostile struct {
		name, addr string
		send       func(w io.Writer) error
	}
	lineOf := func(n int) func(io.Writer) error {
		return func(w io.Writer) error {
			if _, err := io.WriteString(w, "request=smtpd_access_policy\nhelo_name="); err != nil {
				return err
			}
			chunk := bytes.Repeat([]byte("x"), 1<<20)
			for range n {
				if _, err := w.Write(chunk); err != nil {
					return err
				}
			}
			return nil
		}
	}
	attrs := func(w io.Writer) error {
		var b bytes.Buffer
		b.WriteString("request=smtpd_access_policy\n")
		for i := range 100000 {
			fmt.Fprintf(&b, "attr%d=%d\n", i, i)
		}
		b.WriteString("\n")
		_, err := w.Write(b.Bytes())
		return err
	}
	raw := func(b []byte) func(io.Writer) error {
		return func(w io.Writer) error { _, err := w.Write(b); return err }
	}
	milterPacket := func(cmd byte, data string) []byte {
		return append(binary.BigEndian.AppendUint32(nil, uint32(len(data)+1)), append([]byte{cmd}, data...)...)
	}
	truncatedHelo := milterPacket('H', "client.example\x00")[:10]
	negotiate := milterPacket('O', "\x00\x00\x00\x06\x00\x00\x01\xff\x00\x1f\xff\xff")
	// Header lines although policyd negotiated none: go-milter kept each
	// until the end of the headers (4 x 500 MiB took RSS to 3 GB).
	headerFlood := func(w io.Writer) error {
		if _, err := w.Write(negotiate); err != nil {
			return err
		}
		line := milterPacket('L', "X-Flood\x00"+strings.Repeat("x", 60000)+"\x00")
		for range 2000 { // 120 MB
			if _, err := w.Write(line); err != nil {
				return err
			}
		}
		return nil
	}
	// The largest macro a packet holds before each of 256 HELOs: each
	// connection kept all of them (15 MB) before macros were bounded in bytes.
	macroFlood := func(w io.Writer) error {
		if _, err := w.Write(append(negotiate, milterPacket('C', "client.example\x004\x00\x0019\x00192.0.2.30\x00")...)); err != nil {
			return err
		}
		value := strings.Repeat("v", 60000)
		for i := range 256 {
			if _, err := w.Write(append(milterPacket('D', fmt.Sprintf("H{m%d}\x00%s\x00", i, value)), milterPacket('H', "helo.example\x00")...)); err != nil {
				return err
			}
		}
		return nil
	}
	cases := []hostile{
		{"policy 10 MB line", d.policy, lineOf(10)},
		{"policy 100000 attributes", d.policy, attrs},
		{"policy binary junk", d.policy, raw(randomBytes(1, 1<<20))},
		{"milter length 0xFFFFFFFF", d.milter, raw([]byte{0xff, 0xff, 0xff, 0xff, 'O'})},
		{"milter truncated packet", d.milter, raw(truncatedHelo)},
		{"milter truncated length", d.milter, raw([]byte{0, 0})},
		{"milter truncated after a good packet", d.milter, raw(append(milterPacket('O', "\x00\x00\x00\x06\x00\x00\x01\xff\x00\x1f\xff\xff"), truncatedHelo...))},
		{"milter binary junk", d.milter, raw(randomBytes(2, 1<<20))},
	}
	for i := range 3 {
		cases = append(cases, hostile{fmt.Sprintf("milter header flood %d", i), d.milter, headerFlood})
	}
	for i := range 8 {
		cases = append(cases, hostile{fmt.Sprintf("milter macro flood %d", i), d.milter, macroFlood})
	}
	var wg sync.WaitGroup
	for _, tc := range cases {
		wg.Go(func() {
			c, err := net.Dial("tcp", tc.addr)
			if err != nil {
				t.Errorf("%s: %v", tc.name, err)
				return
			}
			defer c.Close()
			sent := make(chan error, 1)
			go func() {
				err := tc.send(c)
				// The end of the input, for the truncated packets.
				_ = c.(*net.TCPConn).CloseWrite()
				sent <- err
			}()
			_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
			got, err := io.ReadAll(c)
			var ne net.Error
			switch {
			case errors.As(err, &ne) && ne.Timeout():
				t.Errorf("%s: the daemon kept the connection open for 10s", tc.name)
			case tc.addr == d.policy && len(got) > 0:
				t.Errorf("%s: answered %q", tc.name, got)
			}
			// The sender stops at the close (or a reset) at the latest.
			<-sent
		})
	}
	wg.Wait()

	// The MTA is still served, promptly, with every idle connection held.
	start := time.Now()
	policyOK("2")
	milterSession(t, d.milter, "192.0.2.22")
	answered := time.Since(start)

	rss, hwm := procStatus(t, pid, "VmRSS"), procStatus(t, pid, "VmHWM")
	t.Logf("RSS %.1f MB before, %.1f MB under load, peak %.1f MB; goroutines %v at baseline, %v with %d idle connections; correct requests answered in %v",
		float64(rssBefore)/(1<<20), float64(rss)/(1<<20), float64(hwm)/(1<<20), baseline, peak, 2*idle, answered.Round(time.Millisecond))
	if hwm >= maxRSS {
		t.Errorf("the daemon's RSS peaked at %d MB, limit %d MB", hwm>>20, maxRSS>>20)
	}

	for _, series := range []string{
		`policyd_limit_hits_total{limit="line_length",protocol="policy"}`,
		`policyd_limit_hits_total{limit="attributes",protocol="policy"}`,
		`policyd_limit_hits_total{limit="packet_size",protocol="milter"}`,
	} {
		if v := metricValue(t, d, series); v < 1 {
			t.Errorf("%s = %v after the hostile input", series, v)
		}
	}
	for _, l := range []string{"policy connection dropped", "milter connection dropped"} {
		if !strings.Contains(d.log.String(), l) {
			t.Errorf("the daemon never logged %q", l)
		}
	}

	for _, c := range held {
		c.Close()
	}
	held = nil
	after := pollMetric(t, d, "go_goroutines", func(v float64) bool { return v <= baseline })
	t.Logf("goroutines back to %v (baseline %v) once the hostile connections closed", after, baseline)
	if rc := d.stop(t); rc != 0 {
		t.Fatalf("exit code %d after SIGTERM", rc)
	}
}

// The limit flags reach the front-ends: a daemon started with low limits
// drops an idle client and refuses connections over the limit, on both
// listeners, and counts each.
func TestDaemonLimitFlags(t *testing.T) {
	d := startDaemon(t, "--milter-listen", "127.0.0.1:0",
		"--policy-idle-timeout", "200ms", "--milter-idle-timeout", "200ms",
		"--policy-max-conns", "1", "--milter-max-conns", "1")
	for _, l := range []struct{ protocol, addr string }{{"policy", d.policy}, {"milter", d.milter}} {
		first, err := net.Dial("tcp", l.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer first.Close()
		// The first connection takes the only slot until the idle timeout
		// drops it; a second one meanwhile is refused.
		hits := fmt.Sprintf(`policyd_limit_hits_total{limit="connections",protocol="%s"}`, l.protocol)
		deadline := time.Now().Add(30 * time.Second)
		for metricValue(t, d, hits) < 1 {
			if time.Now().After(deadline) {
				t.Fatalf("%s: no connection refused over --%s-max-conns 1", l.protocol, l.protocol)
			}
			second, err := net.Dial("tcp", l.addr)
			if err != nil {
				t.Fatal(err)
			}
			droppedByDaemon(t, second)
			second.Close()
		}
		droppedByDaemon(t, first)
		pollMetric(t, d, fmt.Sprintf(`policyd_limit_hits_total{limit="idle_time",protocol="%s"}`, l.protocol), func(v float64) bool { return v >= 1 })
	}
}

// Each limit flag: its default is the front-end's, its environment twin
// sets it, and a value that would disable the limit is refused.
func TestLimitFlags(t *testing.T) {
	defaults := map[string]string{
		"policy-max-line":      strconv.Itoa(postfixpolicy.DefaultLimits.MaxLine),
		"policy-max-attrs":     strconv.Itoa(postfixpolicy.DefaultLimits.MaxAttrs),
		"policy-max-request":   strconv.Itoa(postfixpolicy.DefaultLimits.MaxRequest),
		"policy-max-conns":     strconv.Itoa(postfixpolicy.DefaultMaxConns),
		"policy-max-sessions":  strconv.Itoa(postfixpolicy.DefaultMaxSessions),
		"policy-idle-timeout":  postfixpolicy.DefaultIdleTimeout.String(),
		"policy-max-conn-time": postfixpolicy.DefaultMaxConnTime.String(),
		"milter-max-packet":    strconv.Itoa(milter.DefaultMaxPacket),
		"milter-max-macros":    strconv.Itoa(milter.DefaultMaxMacros),
		"milter-max-conns":     strconv.Itoa(milter.DefaultMaxConns),
		"milter-idle-timeout":  milter.DefaultIdleTimeout.String(),
		"milter-max-conn-time": milter.DefaultMaxConnTime.String(),
	}
	defs := flagDefaults()
	for name, want := range defaults {
		if defs[name] != want {
			t.Errorf("--%s defaults to %q, want %q", name, defs[name], want)
		}
	}
	// Postfix's own connection lifetimes must fit in ours.
	if postfixpolicy.DefaultMaxConnTime <= 1000*time.Second || postfixpolicy.DefaultIdleTimeout <= 300*time.Second {
		t.Error("a policy limit would cut a connection Postfix still uses (max_ttl 1000s, max_idle 300s)")
	}
	runOptionCases(t, []optionCase{
		{name: "defaults", want: func(o options) bool {
			return o.policyMaxLine == postfixpolicy.DefaultLimits.MaxLine && o.milterMaxPacket == milter.DefaultMaxPacket &&
				o.policyMaxConnTime == postfixpolicy.DefaultMaxConnTime && o.milterIdle == milter.DefaultIdleTimeout
		}},
		{name: "flags", args: []string{"--policy-max-attrs", "50", "-milter-max-conn-time=2h", "--milter-max-macros", "9"}, want: func(o options) bool {
			return o.policyMaxAttrs == 50 && o.milterMaxConnTime == 2*time.Hour && o.milterMaxMacros == 9
		}},
		{name: "environment twins", env: map[string]string{"POLICYD_MILTER_MAX_PACKET": "4096", "POLICYD_POLICY_IDLE_TIMEOUT": "1m", "POLICYD_POLICY_MAX_SESSIONS": "10"}, want: func(o options) bool {
			return o.milterMaxPacket == 4096 && o.policyIdle == time.Minute && o.policyMaxSessions == 10
		}},
		{name: "flag wins", args: []string{"--policy-max-conns", "7"}, env: map[string]string{"POLICYD_POLICY_MAX_CONNS": "8"}, want: func(o options) bool {
			return o.policyMaxConns == 7
		}},
		{name: "zero", args: []string{"--policy-max-line", "0"}, err: "not a whole number from 1 to"},
		{name: "negative", args: []string{"--milter-max-conns", "-1"}, err: "not a whole number from 1 to"},
		{name: "over the bound", args: []string{"--milter-max-packet", "2000000"}, err: "from 1 to 1048576"},
		{name: "not a number", env: map[string]string{"POLICYD_POLICY_MAX_REQUEST": "lots"}, err: "POLICYD_POLICY_MAX_REQUEST"},
		{name: "zero duration", args: []string{"--milter-idle-timeout", "0s"}, err: "not a positive duration"},
		{name: "negative duration", env: map[string]string{"POLICYD_POLICY_MAX_CONN_TIME": "-1h"}, err: "not a positive duration"},
	})
}
