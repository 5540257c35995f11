// Package benchmta measures policyd through a real Postfix and a real Exim
// (make bench-mta):
// smtp-source sends the same messages through a private Postfix wired to
// policyd, then to a no-op server of the same protocol, in turns, and the
// report gives policyd's throughput as a share of the no-op's.
package benchmta

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/testing/testmta"
)

// Each run sends this many messages over 16 sessions at once; Exim, which
// forks and syncs its spool per message, takes about a fifth as many per
// second on this kind of machine, so it gets fewer.
const (
	messages     = 3000
	eximMessages = 600
	sessions     = 16
	rounds       = 3
)

// BenchmarkMTA is make bench-mta. It is a benchmark, not a test: it runs
// only when asked (-bench), and it needs Postfix and smtp-source.
func BenchmarkMTA(b *testing.B) {
	source, err := exec.LookPath("smtp-source")
	if err != nil {
		source = "/usr/sbin/smtp-source"
		if _, err := os.Stat(source); err != nil {
			b.Fatal("smtp-source is missing: apt-get install postfix")
		}
	}
	bin := b.TempDir()
	for _, cmd := range []string{"policyd", "policyload"} {
		if out, err := exec.Command("go", "build", "-o", filepath.Join(bin, cmd), "../../cmd/"+cmd).CombinedOutput(); err != nil {
			b.Fatalf("building %s: %v\n%s", cmd, err, out)
		}
	}
	cfg := b.TempDir()
	// The chain of make bench, nothing refused: every rule runs.
	write(b, filepath.Join(cfg, "plugins"), "whitelist\nconnection_shaper threshold 1000000000 exptime 60\nclient_stats\ndeny_repeat_offenders threshold 1000000\n")
	write(b, filepath.Join(cfg, "whitelist"), "clients 192.0.2.0/24\n")

	type setup struct {
		name, proto string
		addr        string
	}
	policyd := startProc(b, filepath.Join(bin, "policyd"), "serve", "--config", cfg, "--state-dir", b.TempDir(),
		"--policy-listen", "127.0.0.1:0", "--milter-listen", "127.0.0.1:0", "--http-listen", "", "--log-level", "info")
	addrs := policyd.waitAddrs(b, "policy delegation listening", "milter listening")
	pdPolicy, pdMilter := addrs["policy delegation listening"], addrs["milter listening"]
	noopPolicy := startProc(b, filepath.Join(bin, "policyload"), "-serve-baseline", "-proto", "policy").firstLine(b)
	noopMilter := startProc(b, filepath.Join(bin, "policyload"), "-serve-baseline", "-proto", "milter").firstLine(b)
	setups := []setup{
		{"Postfix + policy: no-op server", "policy", noopPolicy},
		{"Postfix + policy: policyd", "policy", pdPolicy},
		{"Postfix + milter: no-op milter", "milter", noopMilter},
		{"Postfix + milter: policyd", "milter", pdMilter},
		{"Exim alone", "exim", ""},
		{"Exim + policy: no-op server", "exim", noopPolicy},
		{"Exim + policy: policyd", "exim", pdPolicy},
	}
	mtaAddrs := make([]string, len(setups))
	for i, s := range setups {
		if s.proto == "exim" {
			mtaAddrs[i] = testmta.StartExim(b, eximOptions(b, s.addr)).Addr()
			continue
		}
		mtaAddrs[i] = testmta.Start(b, testmta.Options{ExtraMainCF: mainCF(b, s.proto, s.addr)}).Addr()
	}
	rates := make([][]float64, len(setups))
	for range rounds {
		for i, s := range setups {
			n := messages
			if s.proto == "exim" {
				n = eximMessages
			}
			start := time.Now()
			out, err := exec.Command(source, "-s", strconv.Itoa(sessions), "-m", strconv.Itoa(n),
				"-f", "sender@example.org", "-t", "rcpt@example.test", "-l", "2048", mtaAddrs[i]).CombinedOutput()
			d := time.Since(start)
			if err != nil || len(out) > 0 {
				b.Fatalf("%s: smtp-source: %v\n%s", s.name, err, out)
			}
			rates[i] = append(rates[i], float64(n)/d.Seconds())
		}
	}
	// The median of the rounds: one slow moment of a shared machine does
	// not decide.
	med := make([]float64, len(setups))
	for i := range setups {
		r := append([]float64(nil), rates[i]...)
		sort.Float64s(r)
		med[i] = r[len(r)/2]
	}
	fmt.Printf("\nThrough a private MTA, smtp-source -s %d -m %d (Exim: %d; 2 kB messages), median of %d rounds:\n\n", sessions, messages, eximMessages, rounds)
	fmt.Printf("| set-up | messages/s | rounds |\n|---|---|---|\n")
	for i, s := range setups {
		fmt.Printf("| %s | %.0f | %s |\n", s.name, med[i], joinRates(rates[i]))
	}
	pr, mr, er, ea := med[1]/med[0], med[3]/med[2], med[6]/med[5], med[6]/med[4]
	fmt.Printf("\npolicy (RCPT and END-OF-DATA): policyd %.2f× Postfix + the no-op policy server (aim ≥ 0.95)\n", pr)
	fmt.Printf("milter: policyd %.2f× Postfix + the no-op milter (aim ≥ 0.9)\n", mr)
	fmt.Printf("Exim (RCPT, DATA and QUIT ACLs of deploy/exim, a connection per request): policyd %.2f× Exim + the no-op policy server, %.2f× Exim alone\n", er, ea)
	b.ReportMetric(pr, "policy-ratio")
	b.ReportMetric(mr, "milter-ratio")
	b.ReportMetric(er, "exim-ratio")
}

// eximOptions wires a private Exim as deploy/exim says; no policy server
// at all when policy is empty.
func eximOptions(b *testing.B, policy string) testmta.EximOptions {
	if policy == "" {
		return testmta.EximOptions{}
	}
	return testmta.EximDeployOptions(b, filepath.Join("..", ".."), policy)
}

func joinRates(r []float64) string {
	s := make([]string, len(r))
	for i, v := range r {
		s[i] = strconv.FormatFloat(v, 'f', 0, 64)
	}
	return strings.Join(s, ", ")
}

// mainCF is the recommended wiring of deploy/postfix for proto, pointed at
// addr. The load comes from 127.0.0.1, which must not be in mynetworks
// (permit_mynetworks comes before the policy check).
func mainCF(b *testing.B, proto, addr string) []string {
	name, def := "main.cf-policy", "inet:127.0.0.1:10040"
	if proto == "milter" {
		name, def = "main.cf-milter", "inet:127.0.0.1:10041"
	}
	data, err := os.ReadFile(filepath.Join("..", "..", "deploy", "postfix", name))
	if err != nil {
		b.Fatal(err)
	}
	s := strings.ReplaceAll(string(data), def, "inet:"+addr)
	lines := []string{"mynetworks = 127.0.0.200/32", "relay_domains = example.test"}
	return append(lines, strings.Split(strings.TrimRight(s, "\n"), "\n")...)
}

func write(b *testing.B, name, text string) {
	if err := os.WriteFile(name, []byte(text), 0o644); err != nil {
		b.Fatal(err)
	}
}

// proc is a child process whose output the benchmark reads line by line.
type proc struct {
	cmd   *exec.Cmd
	lines chan string
	stdin io.WriteCloser
}

func startProc(b *testing.B, name string, args ...string) *proc {
	p := &proc{cmd: exec.Command(name, args...), lines: make(chan string, 1024)}
	out, err := p.cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	p.cmd.Stderr = p.cmd.Stdout
	// policyload -serve-baseline runs until its stdin closes.
	if p.stdin, err = p.cmd.StdinPipe(); err != nil {
		b.Fatal(err)
	}
	if err := p.cmd.Start(); err != nil {
		b.Fatal(err)
	}
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			select {
			case p.lines <- sc.Text():
			default: // nobody reads any more: drop
			}
		}
		close(p.lines)
	}()
	b.Cleanup(func() {
		p.stdin.Close()
		_ = p.cmd.Process.Kill()
		_ = p.cmd.Wait()
	})
	return p
}

// waitAddrs waits for the log lines with msgs and returns their addr=,
// by message.
func (p *proc) waitAddrs(b *testing.B, msgs ...string) map[string]string {
	found := map[string]string{}
	timeout := time.After(15 * time.Second)
	for len(found) < len(msgs) {
		select {
		case line, ok := <-p.lines:
			if !ok {
				b.Fatalf("%s exited before logging %q", p.cmd.Path, msgs)
			}
			for _, msg := range msgs {
				if strings.Contains(line, `msg="`+msg+`"`) {
					if _, addr, ok := strings.Cut(line, " addr="); ok {
						found[msg] = strings.Fields(addr)[0]
					}
				}
			}
		case <-timeout:
			b.Fatalf("%s did not log %q within 15s", p.cmd.Path, msgs)
		}
	}
	return found
}

// firstLine is the first line the process prints: the no-op server's
// address.
func (p *proc) firstLine(b *testing.B) string {
	select {
	case line, ok := <-p.lines:
		if !ok {
			b.Fatalf("%s exited without printing its address", p.cmd.Path)
		}
		return strings.TrimSpace(line)
	case <-time.After(15 * time.Second):
		b.Fatalf("%s printed no address within 15s", p.cmd.Path)
	}
	return ""
}
