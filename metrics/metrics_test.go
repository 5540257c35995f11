package metrics

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil/promlint"
	dto "github.com/prometheus/client_model/go"

	"github.com/policyd-mail/policyd/rules"
	"github.com/policyd-mail/policyd/store"
	"github.com/policyd-mail/policyd/store/memory"
)

// exercised returns a registry in which every policyd series has at least
// one child, as after some traffic.
func exercised(t *testing.T) *Registry {
	t.Helper()
	r := New(BuildInfo{Version: "v1.2.3", GoVersion: "go1.26"})
	r.Decision("policy", rules.HookConnect, "connection_shaper", rules.DenySoft, false)
	r.Decision("milter", rules.HookRcpt, "badrcptto", rules.Deny, true)
	r.HookDuration("policy", rules.HookConnect, 300*time.Microsecond)
	r.RuleError("connection_shaper", rules.HookConnect, "store")
	r.RuleError("greylisting", rules.HookRcpt, "panic")
	r.ConfigReload(false)
	r.Delayed("policy", rules.HookData, "spamthrottle:1", 1500*time.Millisecond)
	r.SessionsOpen("policy", func() int { return 3 })
	r.SessionsOpen("milter", func() int { return 0 })
	r.LimitHits("policy", "line_length", "connections")("line_length")
	r.LimitHits("milter", "packet_size")
	r.StoreSize(func() (int, int, int, int) { return 7, 2048, 280, 40 })
	st := InstrumentStore(memory.New(memory.Options{}), r)
	if _, err := st.Incr(context.Background(), store.Key("192.0.2.1", "connection_shaper", "sessions"), 1, time.Minute); err != nil {
		t.Fatal(err)
	}
	return r
}

func gather(t *testing.T, r *Registry) map[string]*dto.MetricFamily {
	t.Helper()
	mfs, err := r.Gatherer().Gather()
	if err != nil {
		t.Fatal(err)
	}
	out := map[string]*dto.MetricFamily{}
	for _, mf := range mfs {
		out[mf.GetName()] = mf
	}
	return out
}

func TestPromlint(t *testing.T) {
	mfs, err := exercised(t).Gatherer().Gather()
	if err != nil {
		t.Fatal(err)
	}
	problems, err := promlint.NewWithMetricFamilies(mfs).Lint()
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range problems {
		t.Errorf("promlint: %s: %s", p.Metric, p.Text)
	}
}

// The names and labels of SPEC §7, and no label that could hold a client.
func TestNamesAndLabels(t *testing.T) {
	want := map[string][]string{
		"policyd_decisions_total":            {"answer", "dry_run", "hook", "protocol", "rule"},
		"policyd_hook_duration_seconds":      {"hook", "protocol"},
		"policyd_sessions_open":              {"protocol"},
		"policyd_store_operations_total":     {"op", "result"},
		"policyd_store_duration_seconds":     {"op"},
		"policyd_config_reloads_total":       {"result"},
		"policyd_rule_errors_total":          {"kind", "rule"},
		"policyd_panics_total":               {"rule"},
		"policyd_limit_hits_total":           {"limit", "protocol"},
		"policyd_build_info":                 {"goversion", "version"},
		"policyd_spamthrottle_delay_seconds": {"hook", "protocol", "rule"},
		"policyd_store_records":              nil,
		"policyd_store_bytes":                {"part"},
		"go_goroutines":                      nil,
		"process_cpu_seconds_total":          nil,
	}
	got := gather(t, exercised(t))
	for name, labels := range want {
		mf, ok := got[name]
		if !ok {
			t.Errorf("%s is not exposed", name)
			continue
		}
		var names []string
		for _, lp := range mf.GetMetric()[0].GetLabel() {
			names = append(names, lp.GetName())
		}
		if !reflect.DeepEqual(names, labels) {
			t.Errorf("%s labels = %v, want %v", name, names, labels)
		}
	}
	forbidden := []string{"client", "ip", "addr", "address", "sender", "from", "rcpt", "recipient", "helo", "queue_id"}
	for name, mf := range got {
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				for _, f := range forbidden {
					if strings.Contains(lp.GetName(), f) {
						t.Errorf("%s has label %q: no client data in labels", name, lp.GetName())
					}
				}
				if strings.Contains(lp.GetValue(), "192.0.2.1") {
					t.Errorf("%s has a client address in label %s", name, lp.GetName())
				}
			}
		}
	}
}

func TestValues(t *testing.T) {
	r := exercised(t)
	rec := httptest.NewRecorder()
	r.Handler().ServeHTTP(rec, httptest.NewRequest("GET", "/metrics", nil))
	body, _ := io.ReadAll(rec.Result().Body)
	for _, line := range []string{
		`policyd_decisions_total{answer="DENYSOFT",dry_run="false",hook="connect",protocol="policy",rule="connection_shaper"} 1`,
		`policyd_decisions_total{answer="DENY",dry_run="true",hook="rcpt",protocol="milter",rule="badrcptto"} 1`,
		`policyd_hook_duration_seconds_bucket{hook="connect",protocol="policy",le="0.0005"} 1`,
		`policyd_hook_duration_seconds_bucket{hook="connect",protocol="policy",le="0.00025"} 0`,
		`policyd_rule_errors_total{kind="store",rule="connection_shaper"} 1`,
		`policyd_rule_errors_total{kind="panic",rule="greylisting"} 1`,
		`policyd_panics_total{rule="greylisting"} 1`,
		`policyd_config_reloads_total{result="failure"} 1`,
		`policyd_config_reloads_total{result="success"} 0`,
		`policyd_sessions_open{protocol="policy"} 3`,
		`policyd_sessions_open{protocol="milter"} 0`,
		`policyd_store_operations_total{op="incr",result="ok"} 1`,
		`policyd_store_operations_total{op="incr",result="unavailable"} 0`,
		`policyd_store_operations_total{op="get",result="ok"} 0`,
		`policyd_store_duration_seconds_count{op="incr"} 1`,
		`policyd_build_info{goversion="go1.26",version="v1.2.3"} 1`,
		`policyd_limit_hits_total{limit="line_length",protocol="policy"} 1`,
		`policyd_limit_hits_total{limit="connections",protocol="policy"} 0`,
		`policyd_limit_hits_total{limit="packet_size",protocol="milter"} 0`,
		`policyd_spamthrottle_delay_seconds_bucket{hook="data",protocol="policy",rule="spamthrottle:1",le="1"} 0`,
		`policyd_spamthrottle_delay_seconds_bucket{hook="data",protocol="policy",rule="spamthrottle:1",le="2.5"} 1`,
		`policyd_store_records 7`,
		`policyd_store_bytes{part="index"} 2048`,
		`policyd_store_bytes{part="records"} 280`,
		`policyd_store_bytes{part="dead"} 40`,
	} {
		if !strings.Contains(string(body), "\n"+line+"\n") {
			t.Errorf("/metrics lacks\n  %s", line)
		}
	}
	if t.Failed() {
		t.Logf("/metrics:\n%s", body)
	}
}

// failing is a store whose every operation fails with err.
type failing struct {
	store.Store
	err error
}

func (f failing) Get(context.Context, string) ([]byte, bool, error) { return nil, false, f.err }

func TestStoreResults(t *testing.T) {
	r := New(BuildInfo{})
	for _, tc := range []struct {
		err  error
		want string
	}{
		{fmt.Errorf("redis get k: %w", store.ErrUnavailable), "unavailable"},
		{fmt.Errorf("redis get k: %w", context.DeadlineExceeded), "unavailable"},
		{context.Canceled, "canceled"},
		{fmt.Errorf("memory get k: %w", store.ErrWrongType), "error"},
	} {
		st := InstrumentStore(failing{Store: memory.New(memory.Options{}), err: tc.err}, r)
		if _, _, err := st.Get(context.Background(), "k"); !errors.Is(err, tc.err) {
			t.Fatalf("error not passed through: %v", err)
		}
		if got := counter(t, r, "policyd_store_operations_total", "get", tc.want); got < 1 {
			t.Errorf("%v: not counted as %s", tc.err, tc.want)
		}
	}
}

func counter(t *testing.T, r *Registry, name string, labelValues ...string) float64 {
	t.Helper()
	mf := gather(t, r)[name]
	for _, m := range mf.GetMetric() {
		var vs []string
		for _, lp := range m.GetLabel() {
			vs = append(vs, lp.GetValue())
		}
		if reflect.DeepEqual(vs, labelValues) {
			return m.GetCounter().GetValue()
		}
	}
	return -1
}

// Every method of store.Store but Close is counted under its own name, so a
// method added to the interface cannot go unmeasured: this fails until the
// wrapper has it.
func TestEveryStoreOperationIsCounted(t *testing.T) {
	r := New(BuildInfo{})
	st := InstrumentStore(memory.New(memory.Options{}), r)
	v := reflect.ValueOf(st)
	it := reflect.TypeFor[store.Store]()
	for i := range it.NumMethod() {
		m := it.Method(i)
		op := strings.ToLower(m.Name)
		if op == "close" {
			continue
		}
		fn := v.MethodByName(m.Name)
		ft := fn.Type()
		n := ft.NumIn()
		if ft.IsVariadic() {
			n-- // Call makes the empty variadic slice itself
		}
		args := make([]reflect.Value, n)
		for j := range n {
			args[j] = reflect.Zero(ft.In(j))
		}
		args[0] = reflect.ValueOf(context.Background())
		func() {
			defer func() { _ = recover() }() // zero arguments may upset a backend; only the counting matters
			fn.Call(args)
		}()
		var total float64
		for _, res := range storeResults {
			total += counter(t, r, "policyd_store_operations_total", op, res)
		}
		if total != 1 {
			t.Errorf("store.Store.%s is not counted as op=%q (add its wrapper in metrics/store.go)", m.Name, op)
		}
	}
}

// The store wrapper costs two clock reads and two atomic adds per call.
func BenchmarkInstrumentedIncr(b *testing.B) {
	r := New(BuildInfo{})
	st := InstrumentStore(memory.New(memory.Options{}), r)
	ctx := context.Background()
	key := store.Key("192.0.2.1", "bench", "n")
	for b.Loop() {
		_, _ = st.Incr(ctx, key, 1, time.Minute)
	}
}
