package main

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// writeLog writes a busy server's day in Postfix's maillog_file form:
// sessions of 100 smtpd processes from 5000 clients, each a connect, one
// message (client=, cleanup, qmgr from=, two deliveries, removed) and a
// disconnect, with other programs' lines between; lines is about how many.
func writeLog(b *testing.B, name string, lines int) int {
	f, err := os.Create(name)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	w := bufio.NewWriterSize(f, 1<<20)
	t := time.Date(2026, 12, 4, 0, 0, 0, 0, time.UTC)
	n := 0
	line := func(prog string, pid int, format string, a ...any) {
		fmt.Fprintf(w, "%s mx %s[%d]: %s\n", t.Format("Jan 02 15:04:05"), prog, pid, fmt.Sprintf(format, a...))
		n++
	}
	for i := 0; n < lines; i++ {
		if i%20 == 0 {
			t = t.Add(time.Second)
		}
		pid := 1000 + i%100
		ip := fmt.Sprintf("10.%d.%d.%d", i%5000/250, i%250, 1+i%7)
		qid := fmt.Sprintf("%X", 0x10000000+i)
		line("postfix/smtpd", pid, "connect from c%d.example[%s]", i%5000, ip)
		line("postfix/smtpd", pid, "%s: client=c%d.example[%s]", qid, i%5000, ip)
		line("postfix/cleanup", 900, "%s: message-id=<%d@c.example>", qid, i)
		line("postfix/qmgr", 800, "%s: from=<u%d@sender%d.example>, size=%d, nrcpt=2 (queue active)", qid, i%977, i%31, 2000+i%5000)
		line("postfix/smtpd", pid, "disconnect from c%d.example[%s] ehlo=1 mail=1 rcpt=2 data=1 quit=1 commands=6", i%5000, ip)
		line("postfix/local", 700, "%s: to=<r%d@example.test>, relay=local, delay=0.1, status=sent (delivered)", qid, i%300)
		line("postfix/local", 700, "%s: to=<r%d@example.test>, relay=local, delay=0.1, status=sent (delivered)", qid, (i+1)%300)
		line("postfix/qmgr", 800, "%s: removed", qid)
		if i%10 == 0 {
			line("CRON", 42, "(root) CMD (true)")
		}
	}
	if err := w.Flush(); err != nil {
		b.Fatal(err)
	}
	return n
}

// BenchmarkReplay1M replays a generated log of a million lines through the
// bench chain with the real (not race-built) binary and reports lines/s
// and the replay's peak RSS.
func BenchmarkReplay1M(b *testing.B) {
	dir := b.TempDir()
	bin := filepath.Join(dir, "policyd")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		b.Fatalf("build: %v\n%s", err, out)
	}
	cfg := filepath.Join(dir, "config")
	os.Mkdir(cfg, 0o755)
	os.WriteFile(filepath.Join(cfg, "plugins"), []byte("whitelist\nconnection_shaper threshold 30 exptime 60\nclient_stats\ndeny_repeat_offenders\ngreylisting\n"), 0o644)
	log := filepath.Join(dir, "maillog")
	n := writeLog(b, log, 1_000_000)
	b.ResetTimer()
	for range b.N {
		cmd := exec.Command(bin, "replay", "--config", cfg, "--year", "2026", log)
		start := time.Now()
		out, err := cmd.CombinedOutput()
		d := time.Since(start)
		if err != nil {
			b.Fatalf("replay: %v\n%s", err, out)
		}
		ru := cmd.ProcessState.SysUsage().(*syscall.Rusage)
		b.ReportMetric(float64(n)/d.Seconds(), "lines/s")
		b.ReportMetric(float64(ru.Maxrss)/1024, "peak-RSS-MiB")
		b.Logf("%d lines in %v, peak RSS %d MiB\n%s", n, d.Round(time.Millisecond), ru.Maxrss/1024, firstLine(out))
	}
}

func firstLine(b []byte) string {
	for i, c := range b {
		if c == '\n' {
			return string(b[:i])
		}
	}
	return string(b)
}
