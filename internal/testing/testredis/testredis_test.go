package testredis

import (
	"net"
	"strings"
	"testing"
	"time"
)

func TestServerStopRestart(t *testing.T) {
	t.Parallel()
	s := Start(t)
	if got := s.MustDo("SET", "k", "v"); got != "OK" {
		t.Fatalf("SET = %q", got)
	}
	if got := s.MustDo("GET", "k"); got != "v" {
		t.Fatalf("GET = %q", got)
	}
	s.Stop()
	if s.PID() != 0 {
		t.Fatal("PID after Stop")
	}
	if c, err := net.DialTimeout("tcp", s.Addr(), time.Second); err == nil {
		c.Close()
		t.Fatal("still listening after Stop")
	}
	s.Restart()
	// Nothing is persisted: a restarted server is empty.
	if got := s.MustDo("GET", "k"); got != "" {
		t.Fatalf("GET after restart = %q, want nil", got)
	}
	if _, err := s.Do("NOSUCHCOMMAND"); err == nil || !strings.Contains(err.Error(), "unknown command") {
		t.Fatalf("error reply: %v", err)
	}
}

func TestSentinelFailover(t *testing.T) {
	t.Parallel()
	set := StartSentinel(t)
	if got := set.MasterAddr(); got != set.Master.Addr() {
		t.Fatalf("sentinels name %s, want %s", got, set.Master.Addr())
	}
	old := set.Master
	set.Failover()
	if set.Master == old || set.MasterAddr() != set.Master.Addr() {
		t.Fatalf("after failover the master is %s", set.MasterAddr())
	}
}

func TestCluster(t *testing.T) {
	t.Parallel()
	c := StartCluster(t)
	owners := map[*Server]bool{}
	for _, k := range []string{"a", "b", "c", "d", "e", "f", "g", "h"} {
		n := c.NodeFor(k)
		n.MustDo("SET", k, "1") // refused with MOVED on any other node
		owners[n] = true
	}
	if len(owners) < 2 {
		t.Fatalf("8 keys landed on %d node(s)", len(owners))
	}
}
