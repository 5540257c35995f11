package testredis

import (
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/policyd-mail/policyd/internal/testing/testnet"
	"github.com/policyd-mail/policyd/internal/testing/testsync"
)

// How long a Sentinel set or a Cluster may take to form.
const formTimeout = 20 * time.Second

// Sentinel is a master, its replica and three sentinels watching it.
type Sentinel struct {
	t         testing.TB
	Master    *Server // the master at start; after Failover, the replica
	Replica   *Server
	Sentinels []*Server
	// Name is the name the sentinels know the master by.
	Name string
}

// StartSentinel starts a master, a replica of it and three sentinels
// (quorum 2), and waits until the replica is in sync and every sentinel
// knows the master and the replica.
func StartSentinel(t testing.TB) *Sentinel {
	t.Helper()
	m := Start(t)
	r := Start(t, "replicaof 127.0.0.1 "+strconv.Itoa(m.Port()))
	set := &Sentinel{t: t, Master: m, Replica: r, Name: "policyd"}
	if !waitFor(formTimeout, func() bool { return r.Info("replication", "master_link_status") == "up" }) {
		t.Fatalf("testredis: replica %s never synced with %s", r.Addr(), m.Addr())
	}
	for range 3 {
		set.Sentinels = append(set.Sentinels, start(t, true, []string{
			"sentinel monitor " + set.Name + " 127.0.0.1 " + strconv.Itoa(m.Port()) + " 2",
			"sentinel down-after-milliseconds " + set.Name + " 1000",
			"sentinel failover-timeout " + set.Name + " 3000",
		}))
	}
	for _, s := range set.Sentinels {
		ok := waitFor(formTimeout, func() bool {
			addr, err := s.Do("SENTINEL", "get-master-addr-by-name", set.Name)
			if err != nil || strings.ReplaceAll(addr, "\n", ":") != m.Addr() {
				return false
			}
			// The replica must be connected and in sync as the sentinel
			// sees it, else SENTINEL FAILOVER finds "no good replica".
			replicas, err := s.Do("SENTINEL", "replicas", set.Name)
			if err != nil {
				return false
			}
			f := pairs(replicas)
			return f["name"] == r.Addr() && f["flags"] == "slave" && f["master-link-status"] == "ok"
		})
		if !ok {
			t.Fatalf("testredis: sentinel %s never learnt master %s and replica %s:\n%s", s.Addr(), m.Addr(), r.Addr(), testsync.Tail(s.Output(), 20))
		}
	}
	return set
}

// Addrs are the sentinels' host:port.
func (s *Sentinel) Addrs() []string {
	var out []string
	for _, x := range s.Sentinels {
		out = append(out, x.Addr())
	}
	return out
}

// URL is the --store URL of the set.
func (s *Sentinel) URL() string {
	return "redis+sentinel://" + strings.Join(s.Addrs(), ",") + "/" + s.Name
}

// MasterAddr asks the first sentinel where the master is.
func (s *Sentinel) MasterAddr() string {
	return strings.ReplaceAll(s.Sentinels[0].MustDo("SENTINEL", "get-master-addr-by-name", s.Name), "\n", ":")
}

// Failover has a sentinel promote the replica (SENTINEL FAILOVER) and
// waits until the sentinels name it and it acts as master; Master and
// Replica are swapped.
func (s *Sentinel) Failover() {
	s.t.Helper()
	want := s.Replica
	s.Sentinels[0].MustDo("SENTINEL", "failover", s.Name)
	ok := waitFor(formTimeout, func() bool {
		return s.MasterAddr() == want.Addr() && want.Info("replication", "role") == "master"
	})
	if !ok {
		s.t.Fatalf("testredis: failover to %s did not happen; sentinels say %s", want.Addr(), s.MasterAddr())
	}
	s.Master, s.Replica = want, s.Master
}

// Cluster is a Redis Cluster of three masters without replicas. A
// master that stops fails only its own slots
// (cluster-require-full-coverage no).
type Cluster struct {
	t     testing.TB
	Nodes []*Server
}

// StartCluster starts three cluster-enabled servers, joins them with
// `redis-cli --cluster create`, and waits until every node reports
// cluster_state:ok.
func StartCluster(t testing.TB) *Cluster {
	t.Helper()
	cli, err := exec.LookPath("redis-cli")
	if err != nil {
		t.Fatalf("testredis: redis-cli not found (%v); `make test` installs it with redis-server", err)
	}
	c := &Cluster{t: t}
	for range 3 {
		c.Nodes = append(c.Nodes, startNode(t))
	}
	args := []string{"--cluster", "create"}
	for _, n := range c.Nodes {
		args = append(args, n.Addr())
	}
	args = append(args, "--cluster-yes")
	out, err := exec.Command(cli, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("testredis: redis-cli %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	c.WaitOK()
	return c
}

// startNode starts one cluster-enabled server; its bus port is chosen
// free too (the default, port+10000, may not exist).
func startNode(t testing.TB) *Server {
	t.Helper()
	bus, err := testnet.FreePort()
	if err != nil {
		t.Fatalf("testredis: %v", err)
	}
	return Start(t,
		"cluster-enabled yes",
		"cluster-config-file nodes.conf",
		"cluster-port "+strconv.Itoa(bus),
		"cluster-node-timeout 1000",
		"cluster-require-full-coverage no",
	)
}

// WaitOK waits until every running node reports cluster_state:ok and
// sees all three masters.
func (c *Cluster) WaitOK() {
	c.t.Helper()
	ok := waitFor(formTimeout, func() bool {
		for _, n := range c.Nodes {
			if n.PID() == 0 {
				continue
			}
			info, err := n.Do("CLUSTER", "INFO")
			if err != nil || !strings.Contains(info, "cluster_state:ok") || !strings.Contains(info, "cluster_known_nodes:3") {
				return false
			}
		}
		return true
	})
	if !ok {
		c.t.Fatalf("testredis: cluster never reached cluster_state:ok:\n%s", c.Nodes[0].MustDo("CLUSTER", "INFO"))
	}
}

// Addrs are the nodes' host:port.
func (c *Cluster) Addrs() []string {
	var out []string
	for _, n := range c.Nodes {
		out = append(out, n.Addr())
	}
	return out
}

// URL is the --store URL of the cluster.
func (c *Cluster) URL() string { return "redis+cluster://" + strings.Join(c.Addrs(), ",") }

// NodeFor is the node serving key's slot, from CLUSTER NODES.
func (c *Cluster) NodeFor(key string) *Server {
	c.t.Helper()
	var ask *Server
	for _, n := range c.Nodes {
		if n.PID() != 0 {
			ask = n
			break
		}
	}
	slot, _ := strconv.Atoi(ask.MustDo("CLUSTER", "KEYSLOT", key))
	// <id> <ip:port@bus> <flags> <master> <ping> <pong> <epoch> <link> <slot>...
	for line := range strings.SplitSeq(ask.MustDo("CLUSTER", "NODES"), "\n") {
		f := strings.Fields(line)
		if len(f) < 9 {
			continue
		}
		addr, _, _ := strings.Cut(f[1], "@")
		for _, r := range f[8:] {
			lo, hi, isRange := strings.Cut(r, "-")
			a, err1 := strconv.Atoi(lo)
			b, err2 := strconv.Atoi(hi)
			if !isRange {
				b, err2 = a, err1
			}
			if err1 != nil || err2 != nil || slot < a || slot > b {
				continue
			}
			for _, n := range c.Nodes {
				if n.Addr() == addr {
					return n
				}
			}
		}
	}
	c.t.Fatalf("testredis: no node serves slot %d of %q", slot, key)
	return nil
}

// pairs reads a flattened name/value reply (one entry per line) into a
// map; the first of a repeated name wins.
func pairs(reply string) map[string]string {
	lines := strings.Split(reply, "\n")
	out := map[string]string{}
	for i := 0; i+1 < len(lines); i += 2 {
		if _, dup := out[lines[i]]; !dup {
			out[lines[i]] = lines[i+1]
		}
	}
	return out
}
