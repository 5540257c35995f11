package storetest

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/policyd-mail/policyd/store"
)

// testFindClient lays out keys the way the rules do for two clients of
// one IPv6 /32 and checks what the admin API finds and forgets. The
// network is random per run, so a shared Redis holds nobody else's keys
// under it.
func testFindClient(t *testing.T, r *runner) {
	e := r.env(t)
	var b [16]byte
	b[0] = 0xfd
	fmt.Sscanf(r.id[:12], "%02x%02x%02x%02x%02x%02x", &b[1], &b[2], &b[3], &b[4], &b[5], &b[6])
	b[7] = byte(e.client[len(e.client)-1])
	a := netip.AddrFrom16(b)
	b[7]++
	other := netip.AddrFrom16(b)
	net64 := netip.PrefixFrom(a, 64).Masked()
	other64 := netip.PrefixFrom(other, 64).Masked()
	net32 := netip.PrefixFrom(a, 32).Masked()

	mk := func(k string) string {
		e.mu.Lock()
		e.keys = append(e.keys, k)
		e.mu.Unlock()
		return k
	}
	stats := store.NewKeys("client_stats", 64)
	shaper := mk(store.NewKeys("connection_shaper", 64).Client(a, "sessions"))
	offender := mk(store.NewKeys("deny_repeat_offenders:1", 64).Client(a, "offender"))
	stats64 := mk(stats.Net(net32, net64))
	stats32 := mk(stats.Net(net32, net32))
	otherShaper := mk(store.NewKeys("connection_shaper", 64).Client(other, "sessions"))
	otherStats := mk(stats.Net(net32, other64))
	e.wantIncr(shaper, 2, longTTL, 2)
	e.wantIncr(otherShaper, 1, longTTL, 1)
	if _, err := e.s.Tally(e.ctx, offender, t0, longTTL, longTTL); err != nil {
		t.Fatal(err)
	}
	e.hincr(longTTL,
		store.FieldIncr{Key: stats64, Field: "permfail", Delta: 1},
		store.FieldIncr{Key: stats32, Field: "permfail", Delta: 2},
		store.FieldIncr{Key: otherStats, Field: "success", Delta: 1})

	keysOf := func(rs []store.Record) []string {
		var ks []string
		for _, r := range rs {
			ks = append(ks, r.Key)
		}
		slices.Sort(ks)
		return ks
	}
	sorted := func(ks ...string) []string { slices.Sort(ks); return ks }

	found, err := store.FindClient(e.ctx, e.s, netip.PrefixFrom(a, 128))
	if err != nil {
		t.Fatal(err)
	}
	if got, want := keysOf(found), sorted(shaper, offender, stats64, stats32); !slices.Equal(got, want) {
		t.Fatalf("FindClient(%s) = %v, want %v", a, got, want)
	}
	for _, rec := range found {
		if rec.Key == offender && (rec.Rule != "deny_repeat_offenders:1" || rec.About != net64 || rec.Kind != store.KindHash || rec.Fields[store.TallyCount] != 1) {
			t.Errorf("offender record = %+v", rec)
		}
		if rec.Key == stats32 && (rec.Rule != "client_stats" || rec.About != net32) {
			t.Errorf("/32 stats record = %+v", rec)
		}
	}

	// The whole /32 holds both clients.
	// A page at a time, in key order: every record once.
	var paged []store.Record
	for after, pages := "", 0; ; pages++ {
		page, next, err := store.FindClientPage(e.ctx, e.s, net32, after, 4)
		if err != nil {
			t.Fatal(err)
		}
		if len(page) > 4 || pages > 2 {
			t.Fatalf("page %d: %d records, next %q", pages, len(page), next)
		}
		paged = append(paged, page...)
		if next == "" {
			break
		}
		after = next
	}
	if got := keysOf(paged); len(got) != 6 || len(slices.Compact(slices.Clone(got))) != 6 {
		t.Fatalf("FindClientPage(%s) pages gave %v, want the 6 keys once each", net32, got)
	}
	all, err := store.FindClient(e.ctx, e.s, net32)
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != 6 {
		t.Fatalf("FindClient(%s) found %v, want all 6 keys", net32, keysOf(all))
	}

	// Forgetting the address forgets its /64: the rules count an IPv6
	// client by it.
	deleted, kept, err := store.ForgetClient(e.ctx, e.s, netip.PrefixFrom(a, 128), 64)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := keysOf(deleted), sorted(shaper, offender, stats64); !slices.Equal(got, want) {
		t.Errorf("ForgetClient deleted %v, want %v", got, want)
	}
	if got := keysOf(kept); !slices.Equal(got, []string{stats32}) {
		t.Errorf("ForgetClient kept %v, want the /32 record", got)
	}
	e.wantMissing(shaper)
	e.wantMissing(offender)
	if left, err := store.FindClient(e.ctx, e.s, net32); err != nil || len(left) != 3 {
		t.Errorf("after forgetting %s the /32 holds %v (%v), want the other client's two keys and the /32 record", net64, keysOf(left), err)
	}
}
