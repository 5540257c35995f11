package main

// Tests of deploy/, the Dockerfile and the README's operations section:
// what an operator installs must agree with what the binary does, so that
// neither can drift without a test failing.

import (
	"bytes"
	"context"
	"debug/elf"
	"encoding/json"
	"flag"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
	"unicode"

	dto "github.com/prometheus/client_model/go"

	"github.com/policyd-mail/policyd/metrics"
	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/store"
	"github.com/policyd-mail/policyd/store/memory"
)

// repoRoot is the repository's top directory, seen from this package.
const repoRoot = "../.."

func readRepoFile(t testing.TB, rel string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, rel))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// flagDefaults are serve's flags with their defaults.
func flagDefaults() map[string]string {
	var o options
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	o.register(fs)
	out := map[string]string{}
	fs.VisitAll(func(f *flag.Flag) { out[f.Name] = f.DefValue })
	return out
}

// exposed is what the daemon's registry exposes once every series has a
// child: the sample names (histograms as _bucket, _sum, _count) and every
// label name.
func exposed(t testing.TB) (names, labels map[string]bool) {
	t.Helper()
	m := metrics.New(metrics.BuildInfo{Version: "test", GoVersion: runtime.Version()})
	m.Decision("policy", rules.HookConnect, "connection_shaper", rules.DenySoft, false)
	m.HookDuration("policy", rules.HookConnect, time.Millisecond)
	m.RuleError("connection_shaper", rules.HookConnect, "panic")
	m.ConfigReload(true)
	m.SessionsOpen("policy", func() int { return 0 })
	m.LimitHits("policy", "line_length")
	m.DryRun(false)
	m.DoubleWiring()
	m.Delayed("policy", rules.HookData, "spamthrottle", time.Second) // a rule's series appear at its first use
	m.RuleEvent("ratelimit", "exceeded")
	// Persisted, as the daemon's is: the policyd_state_* series need a state directory.
	mem, err := memory.Open(memory.Options{Dir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer mem.Close()
	exportStoreSize(m, mem)
	st := metrics.InstrumentStore(mem, m)
	st.Incr(context.Background(), store.Key("192.0.2.1", "x", "y"), 1, time.Minute)
	mfs, err := m.Gatherer().Gather()
	if err != nil {
		t.Fatal(err)
	}
	names = map[string]bool{}
	labels = map[string]bool{"le": true, "quantile": true, "job": true, "instance": true}
	for _, mf := range mfs {
		n := mf.GetName()
		switch mf.GetType() {
		case dto.MetricType_HISTOGRAM:
			names[n+"_bucket"], names[n+"_sum"], names[n+"_count"] = true, true, true
		case dto.MetricType_SUMMARY:
			names[n], names[n+"_sum"], names[n+"_count"] = true, true, true
		default:
			names[n] = true
		}
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				labels[lp.GetName()] = true
			}
		}
	}
	names["up"] = true // Prometheus's own, per scrape target
	return names, labels
}

var (
	promString    = regexp.MustCompile(`"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'`)
	promGrouping  = regexp.MustCompile(`\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)`)
	promSelector  = regexp.MustCompile(`\{([^}]*)\}`)
	promMatcher   = regexp.MustCompile(`([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)`)
	promRange     = regexp.MustCompile(`\[[^\]]*\]`)
	promVariable  = regexp.MustCompile(`\$\{?[a-zA-Z_][a-zA-Z0-9_]*\}?`)
	promFunction  = regexp.MustCompile(`\b([a-zA-Z_][a-zA-Z0-9_]*)\s*\(`)
	promIdent     = regexp.MustCompile(`[a-zA-Z_:][a-zA-Z0-9_:]*`)
	promNumber    = regexp.MustCompile(`\b\d+(\.\d+)?([eE][-+]?\d+)?\b`)
	promFunctions = []string{"sum", "min", "max", "avg", "count", "topk", "bottomk", "rate", "irate", "increase", "delta",
		"histogram_quantile", "abs", "absent", "clamp_min", "label_values", "changes", "resets", "time", "vector", "scalar"}
	promKeywords = []string{"and", "or", "unless", "bool", "offset"}
)

// promNames checks one PromQL expression (or Grafana label_values query)
// and returns the metric names it uses. Every identifier must be a
// function, a keyword, a label the registry has, or a metric it exposes.
func promNames(t testing.TB, expr string, names, labels map[string]bool) []string {
	t.Helper()
	var used []string
	checkLabel := func(l string) {
		if l = strings.TrimSpace(l); l != "" && !labels[l] {
			t.Errorf("%s: no metric has the label %q", expr, l)
		}
	}
	e := expr
	if m := regexp.MustCompile(`^label_values\((.*),\s*([a-zA-Z_]\w*)\)$`).FindStringSubmatch(strings.TrimSpace(e)); m != nil {
		checkLabel(m[2])
		e = m[1]
	}
	for _, m := range promSelector.FindAllStringSubmatch(e, -1) {
		for _, mm := range promMatcher.FindAllStringSubmatch(m[1], -1) {
			checkLabel(mm[1])
		}
	}
	e = promSelector.ReplaceAllString(e, " ")
	e = promString.ReplaceAllString(e, " ")
	for _, m := range promGrouping.FindAllStringSubmatch(e, -1) {
		for l := range strings.SplitSeq(m[2], ",") {
			checkLabel(l)
		}
	}
	e = promGrouping.ReplaceAllString(e, " ")
	e = promRange.ReplaceAllString(e, " ")
	e = promVariable.ReplaceAllString(e, " ")
	for _, m := range promFunction.FindAllStringSubmatch(e, -1) {
		if !slices.Contains(promFunctions, m[1]) {
			t.Errorf("%s: unknown function %s", expr, m[1])
		}
	}
	e = promFunction.ReplaceAllString(e, " (")
	e = promNumber.ReplaceAllString(e, " ")
	for _, id := range promIdent.FindAllString(e, -1) {
		switch {
		case slices.Contains(promKeywords, id):
		case names[id]:
			used = append(used, id)
		default:
			t.Errorf("%s: %s is not a metric policyd exposes", expr, id)
		}
	}
	if len(used) == 0 {
		t.Errorf("%s: names no metric", expr)
	}
	return used
}

// Grafana's dashboard and Prometheus's alert rules name only series the
// registry exposes, with labels it has, and cover what SPEC §7 asks for.
func TestDeployDashboardAndAlertsMatchTheRegistry(t *testing.T) {
	names, labels := exposed(t)

	var dash map[string]any
	if err := json.Unmarshal([]byte(readRepoFile(t, "deploy/grafana/policyd.json")), &dash); err != nil {
		t.Fatalf("deploy/grafana/policyd.json: %v", err)
	}
	if dash["title"] == "" || dash["uid"] == "" {
		t.Error("the dashboard has no title or uid")
	}
	var exprs []string
	var walk func(v any)
	walk = func(v any) {
		switch v := v.(type) {
		case map[string]any:
			for k, x := range v {
				if s, ok := x.(string); ok && (k == "expr" || k == "definition") {
					exprs = append(exprs, s)
				}
				walk(x)
			}
		case []any:
			for _, x := range v {
				walk(x)
			}
		}
	}
	walk(dash)
	panels, _ := dash["panels"].([]any)
	for _, p := range panels {
		p := p.(map[string]any)
		if p["type"] == "row" {
			continue
		}
		if ts, _ := p["targets"].([]any); len(ts) == 0 {
			t.Errorf("panel %q has no query", p["title"])
		}
	}
	used := map[string]bool{}
	for _, e := range exprs {
		for _, n := range promNames(t, e, names, labels) {
			used[n] = true
		}
	}
	for _, n := range []string{"policyd_decisions_total", "policyd_hook_duration_seconds_bucket", "policyd_store_operations_total",
		"policyd_store_duration_seconds_bucket", "policyd_sessions_open", "policyd_config_reloads_total", "policyd_rule_errors_total"} {
		if !used[n] {
			t.Errorf("the dashboard does not show %s", n)
		}
	}

	alerts := readRepoFile(t, "deploy/prometheus/policyd-alerts.yml")
	used = map[string]bool{}
	n := 0
	for _, e := range yamlValues(alerts, "expr") {
		n++
		for _, name := range promNames(t, e, names, labels) {
			used[name] = true
		}
	}
	if n == 0 {
		t.Fatal("no expr: in the alert rules")
	}
	for _, n := range []string{"up", "policyd_store_operations_total", "policyd_config_reloads_total"} {
		if !used[n] {
			t.Errorf("no alert on %s", n)
		}
	}

	scrape := readRepoFile(t, "deploy/prometheus/policyd.yml")
	if !strings.Contains(scrape, "- "+flagDefaults()["http-listen"]) {
		t.Errorf("the scrape config does not target the default --http-listen %s", flagDefaults()["http-listen"])
	}
	if !strings.Contains(scrape, "- policyd-alerts.yml") {
		t.Error("the scrape config does not load policyd-alerts.yml")
	}

	// The README's operations section lists only real metrics.
	for _, n := range regexp.MustCompile(`\bpolicyd_[a-z_]+`).FindAllString(readmeSection(t, "## Operations"), -1) {
		if !names[n] && !names[n+"_bucket"] {
			t.Errorf("README names %s, which policyd does not expose", n)
		}
	}
}

// yamlValues finds the values of key in a YAML file, including block
// scalars (key: |), without a YAML library: enough for the alert rules.
func yamlValues(doc, key string) []string {
	var out []string
	lines := strings.Split(doc, "\n")
	for i := 0; i < len(lines); i++ {
		l := lines[i]
		trimmed := strings.TrimLeft(l, " -")
		v, ok := strings.CutPrefix(trimmed, key+":")
		if !ok {
			continue
		}
		v = strings.TrimSpace(v)
		if v != "|" && v != ">" && v != "|-" && v != ">-" {
			out = append(out, v)
			continue
		}
		indent := len(l) - len(strings.TrimLeft(l, " "))
		var block []string
		for i+1 < len(lines) {
			next := lines[i+1]
			if strings.TrimSpace(next) != "" && len(next)-len(strings.TrimLeft(next, " ")) <= indent {
				break
			}
			block = append(block, strings.TrimSpace(next))
			i++
		}
		out = append(out, strings.TrimSpace(strings.Join(block, " ")))
	}
	return out
}

func readmeSection(t testing.TB, heading string) string {
	t.Helper()
	readme := readRepoFile(t, "README.md")
	_, rest, ok := strings.Cut(readme, "\n"+heading+"\n")
	if !ok {
		t.Fatalf("README has no %q section", heading)
	}
	if i := strings.Index(rest, "\n## "); i >= 0 {
		rest = rest[:i]
	}
	return rest
}

// postconf runs postconf(1) on a scratch configuration directory holding
// main.cf, and fails on any warning (an unknown or misspelled parameter).
func postconf(t *testing.T, mainCF string, args ...string) string {
	t.Helper()
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "main.cf"), []byte(mainCF), 0o644)
	os.WriteFile(filepath.Join(dir, "master.cf"), nil, 0o644)
	cmd := exec.Command("postconf", append([]string{"-c", dir}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil || stderr.Len() > 0 {
		t.Fatalf("postconf %v: %v\n%s", args, err, stderr.String())
	}
	return strings.TrimSpace(string(out))
}

// splitRestrictions splits a Postfix list at top-level commas and blanks;
// a { ... } group stays whole, with the name before it.
func splitRestrictions(v string) []string {
	var toks []string
	var cur strings.Builder
	depth := 0
	for _, r := range v {
		if depth == 0 && (r == ',' || unicode.IsSpace(r)) {
			if cur.Len() > 0 {
				toks = append(toks, cur.String())
				cur.Reset()
			}
			continue
		}
		switch r {
		case '{':
			depth++
		case '}':
			depth--
		}
		cur.WriteRune(r)
	}
	if cur.Len() > 0 {
		toks = append(toks, cur.String())
	}
	var out []string
	for _, tok := range toks {
		if strings.HasPrefix(tok, "{") && len(out) > 0 {
			out[len(out)-1] += " " + tok
			continue
		}
		out = append(out, tok)
	}
	return out
}

// The Postfix snippets are valid main.cf, safe (nothing before
// reject_unauth_destination can let a client relay; policyd failing lets
// mail through) and point at policyd's default listeners.
func TestDeployPostfixSnippets(t *testing.T) {
	defs := flagDefaults()
	policy := readRepoFile(t, "deploy/postfix/main.cf-policy")
	postconf(t, policy, "-n")
	restr := splitRestrictions(postconf(t, policy, "-h", "smtpd_recipient_restrictions"))
	rud := slices.Index(restr, "reject_unauth_destination")
	if rud < 0 {
		t.Fatalf("no reject_unauth_destination in %q", restr)
	}
	for _, r := range restr[:rud] {
		// permit_mynetworks and permit_sasl_authenticated only let trusted
		// clients through; a bare permit, or a check that may answer OK,
		// would let anyone relay.
		if r == "permit" || strings.HasPrefix(r, "check_") || r == "permit_auth_destination" {
			t.Errorf("%q before reject_unauth_destination", r)
		}
	}
	cps := slices.IndexFunc(restr, func(r string) bool { return strings.HasPrefix(r, "check_policy_service") })
	if cps < rud {
		t.Fatalf("check_policy_service is not after reject_unauth_destination: %q", restr)
	}
	svc := restr[cps]
	for _, want := range []string{"inet:" + defs["policy-listen"], "default_action=DUNNO"} {
		if !strings.Contains(svc, want) {
			t.Errorf("%s lacks %s", svc, want)
		}
	}
	m := regexp.MustCompile(`timeout=(\w+)`).FindStringSubmatch(svc)
	if m == nil {
		t.Fatalf("%s has no timeout", svc)
	}
	timeout, _ := time.ParseDuration(m[1])
	maxDelay, _ := time.ParseDuration(defs["policy-max-delay"])
	if timeout <= maxDelay {
		t.Errorf("policy timeout %v is not above --policy-max-delay %v: a held reply would arrive too late", timeout, maxDelay)
	}

	milter := readRepoFile(t, "deploy/postfix/main.cf-milter")
	postconf(t, milter, "-n")
	milters := postconf(t, milter, "-h", "smtpd_milters")
	for _, want := range []string{"inet:" + defs["milter-listen"], "default_action=accept", "connect_timeout=", "command_timeout="} {
		if !strings.Contains(milters, want) {
			t.Errorf("smtpd_milters = %s lacks %s", milters, want)
		}
	}
	if got := postconf(t, milter, "-h", "milter_default_action"); got != "accept" {
		t.Errorf("milter_default_action = %s", got)
	}
	if got := postconf(t, milter, "-h", "milter_protocol"); got != "6" {
		t.Errorf("milter_protocol = %s", got)
	}

	// compose.yaml wires the same settings, with policyd's compose address.
	compose := readRepoFile(t, "deploy/compose.yaml")
	if want := strings.ReplaceAll(milters, defs["milter-listen"], "policyd:10041"); !strings.Contains(compose, want) {
		t.Errorf("compose.yaml does not set smtpd_milters to %s", want)
	}
	if want := strings.ReplaceAll(strings.Join(restr, ", "), defs["policy-listen"], "policyd:10040"); !strings.Contains(compose, want) {
		t.Errorf("compose.yaml does not show smtpd_recipient_restrictions %s", want)
	}
	checkEnvTwins(t, "deploy/compose.yaml", compose)
}

// deployMainCF returns a deploy/postfix snippet with policyd's default
// address replaced by addr, for testmta.Options.ExtraMainCF: the
// end-to-end tests run Postfix with the snippets an operator installs.
func deployMainCF(t testing.TB, name, addr string) []string {
	t.Helper()
	defs := flagDefaults()
	s := readRepoFile(t, "deploy/postfix/"+name)
	s = strings.ReplaceAll(s, "inet:"+defs["policy-listen"], "inet:"+addr)
	s = strings.ReplaceAll(s, "inet:"+defs["milter-listen"], "inet:"+addr)
	if !strings.Contains(s, "inet:"+addr) {
		t.Fatalf("deploy/postfix/%s does not name policyd's default listener", name)
	}
	return strings.Split(strings.TrimRight(s, "\n"), "\n")
}

var mcLine = regexp.MustCompile("(?m)^INPUT_MAIL_FILTER\\(`policyd', `S=inet:(\\d+)@([^,]+), (.*)'\\)")

// deployMilterFlags are the F= and T= equates of deploy/sendmail/policyd.mc,
// which the Sendmail end-to-end test runs with.
func deployMilterFlags(t testing.TB) string {
	t.Helper()
	m := mcLine.FindStringSubmatch(readRepoFile(t, "deploy/sendmail/policyd.mc"))
	if m == nil {
		t.Fatal("deploy/sendmail/policyd.mc has no INPUT_MAIL_FILTER(`policyd', ...) line")
	}
	return m[3]
}

func TestDeploySendmailMC(t *testing.T) {
	mc := readRepoFile(t, "deploy/sendmail/policyd.mc")
	m := mcLine.FindStringSubmatch(mc)
	if m == nil {
		t.Fatal("deploy/sendmail/policyd.mc has no INPUT_MAIL_FILTER(`policyd', ...) line")
	}
	if got, want := m[2]+":"+m[1], flagDefaults()["milter-listen"]; got != want {
		t.Errorf("the .mc points at %s, policyd listens on %s by default", got, want)
	}
	for _, w := range []string{"T=C:", "S:", "R:", "E:"} {
		if !strings.Contains(m[3], w) {
			t.Errorf("the .mc line sets no %s timeout: %s", w, m[3])
		}
	}
	if readme := readRepoFile(t, "README.md"); !strings.Contains(readme, m[0]) {
		t.Errorf("README does not show the .mc line\n  %s", m[0])
	}
	for _, l := range strings.Split(strings.TrimSpace(mc), "\n") {
		if !strings.HasPrefix(l, "dnl") && !strings.HasPrefix(l, "INPUT_MAIL_FILTER(") {
			t.Errorf("stray line in the .mc snippet (comments start with dnl): %q", l)
		}
	}
}

// The unit is what systemd accepts, keeps the hardening asked for, and
// scores "OK" or better in systemd's own exposure rating.
func TestDeploySystemdUnit(t *testing.T) {
	unit := readRepoFile(t, "deploy/systemd/policyd.service")
	for _, want := range []string{
		"ExecStart=/usr/local/bin/policyd serve",
		// A broken config fails start and reload, before the HUP.
		"ExecStartPre=/usr/local/bin/policyd check\n", "ExecReload=/usr/local/bin/policyd check\nExecReload=/bin/kill -HUP $MAINPID",
		"LoadCredential=admin-token:",
		"DynamicUser=yes", "ProtectSystem=strict", "StateDirectory=policyd", "ConfigurationDirectory=policyd",
		"NoNewPrivileges=yes", "PrivateTmp=yes", "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6",
		"CapabilityBoundingSet=\n", "SystemCallFilter=@system-service",
	} {
		if !strings.Contains(unit, want) {
			t.Errorf("the unit lacks %q", want)
		}
	}
	checkEnvTwins(t, "deploy/systemd/policyd.service", unit)
	if _, err := exec.LookPath("systemd-analyze"); err != nil {
		t.Fatal("systemd-analyze is needed to verify the unit (Debian package systemd)")
	}
	// verify insists that ExecStart exists: point it at the test binary.
	dir := t.TempDir()
	path := filepath.Join(dir, "policyd.service")
	os.WriteFile(path, []byte(strings.ReplaceAll(unit, "/usr/local/bin/policyd", binPath)), 0o644)
	for _, args := range [][]string{
		{"verify", path},
		{"security", "--offline=yes", "--threshold=20", path},
	} {
		cmd := exec.Command("systemd-analyze", args...)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil || stderr.Len() > 0 {
			t.Errorf("systemd-analyze %s: %v\n%s%s", args[0], err, stderr.String(), lastLines(string(out), 3))
		}
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// checkEnvTwins fails on a POLICYD_* variable that is no flag's twin.
func checkEnvTwins(t *testing.T, file, text string) {
	t.Helper()
	defs := flagDefaults()
	for _, v := range regexp.MustCompile(`POLICYD_[A-Z_]+`).FindAllString(text, -1) {
		name := strings.ToLower(strings.ReplaceAll(strings.TrimPrefix(v, "POLICYD_"), "_", "-"))
		if _, ok := defs[name]; !ok {
			t.Errorf("%s: %s is not the twin of any flag", file, v)
		}
	}
}

// Docker cannot run here, so the Dockerfile is checked piece by piece,
// and its build stage's go build command is run as written: the binary
// must be static and report the version it was given.
func TestDockerfile(t *testing.T) {
	df := readRepoFile(t, "Dockerfile")
	gomod := readRepoFile(t, "go.mod")
	goVer := regexp.MustCompile(`(?m)^go (\d+\.\d+)`).FindStringSubmatch(gomod)
	if m := regexp.MustCompile(`(?m)^ARG GO_VERSION=(\S+)$`).FindStringSubmatch(df); m == nil || goVer == nil || m[1] != goVer[1] {
		t.Errorf("the builder's GO_VERSION does not match go.mod's go %v", goVer)
	}
	froms := regexp.MustCompile(`(?m)^FROM (\S+)`).FindAllStringSubmatch(df, -1)
	if len(froms) < 2 || !strings.HasPrefix(froms[0][1], "golang:") {
		t.Fatalf("not a multi-stage build from golang: %v", froms)
	}
	if final := froms[len(froms)-1][1]; final != "scratch" && !strings.HasPrefix(final, "gcr.io/distroless/static") {
		t.Errorf("final image %s is neither scratch nor distroless/static", final)
	}
	if m := regexp.MustCompile(`(?m)^USER (\S+)`).FindAllStringSubmatch(df, -1); len(m) == 0 || m[len(m)-1][1] == "root" || strings.HasPrefix(m[len(m)-1][1], "0") {
		t.Errorf("the image does not run as a non-root user: %v", m)
	}
	for _, want := range []string{"EXPOSE 10040 10041 10042", `VOLUME ["/etc/policyd", "/var/lib/policyd"]`,
		"POLICYD_POLICY_LISTEN=0.0.0.0:10040", "POLICYD_MILTER_LISTEN=0.0.0.0:10041", "POLICYD_HTTP_LISTEN=0.0.0.0:10042"} {
		if !strings.Contains(df, want) {
			t.Errorf("the Dockerfile lacks %s", want)
		}
	}
	checkEnvTwins(t, "Dockerfile", df)
	if _, err := os.Stat(filepath.Join(repoRoot, "examples/default/plugins")); err != nil {
		t.Errorf("the image copies examples/default: %v", err)
	}
	for _, l := range strings.Split(readRepoFile(t, ".dockerignore"), "\n") {
		if slices.Contains([]string{"go.mod", "go.sum", "cmd", "rules", "*.go", "**/*.go"}, strings.TrimSpace(l)) {
			t.Errorf(".dockerignore leaves out %s, which the build needs", l)
		}
	}

	build := regexp.MustCompile(`(?m)^RUN (CGO_ENABLED=0 go build .*)$`).FindStringSubmatch(df)
	if build == nil || !strings.Contains(build[1], "-trimpath") || !strings.Contains(build[1], "/out/policyd") {
		t.Fatalf("no RUN CGO_ENABLED=0 go build -trimpath ... -o /out/policyd line: %v", build)
	}
	bin := filepath.Join(t.TempDir(), "policyd")
	cmd := exec.Command("sh", "-c", strings.ReplaceAll(build[1], "/out/policyd", bin))
	cmd.Dir = repoRoot
	cmd.Env = append(os.Environ(), "VERSION=v0.0.0-docker")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", build[1], err, out)
	}
	f, err := elf.Open(bin)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP || p.Type == elf.PT_DYNAMIC {
			t.Errorf("the binary is not static: it has %v", p.Type)
		}
	}
	out, err := exec.Command(bin, "version").Output()
	if err != nil || !strings.HasPrefix(string(out), "policyd v0.0.0-docker ") {
		t.Errorf("version: %q %v", out, err)
	}
	// The image's default config directory is the built-in chain.
	var o bytes.Buffer
	if rc := run([]string{"check", "--config", filepath.Join(repoRoot, "examples/default")}, &o, io.Discard); rc != 0 {
		t.Errorf("examples/default does not check: %s", o.String())
	}
}
