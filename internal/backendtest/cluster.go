// Package backendtest checks the contract of a flannel.Backend and its
// Network on real network namespaces (internal/netlab): Run is the suite
// every dataplane runs, and Cluster is the lab fixture it and the
// dataplanes' own tests build on. It is test support: its functions take a
// *testing.T and fail the test on error.
package backendtest

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/lease"
)

// CheckTimeout bounds each connectivity check (Ping and TCPCheck retry
// until it ends); generous for a loaded 2-core CI machine.
const CheckTimeout = 30 * time.Second

// ClusterOptions configure NewCluster.
type ClusterOptions struct {
	// Lab is the lab to build (Nodes is required).
	Lab netlab.Options
	// Type is the backend type the Env's Config names.
	Type string
	// New returns a fresh, unprepared Backend for node i.
	New func(t *testing.T, i int) flannel.Backend
	// NoNS gives the backends no namespace handle (env.NS is None): no
	// kernel subscriptions, no sysctls.
	NoNS bool
}

// Cluster is a lab whose every node runs a started Network, with one pod.
type Cluster struct {
	Lab    *netlab.Lab
	Nodes  []*Node
	V4, V6 bool
	opts   ClusterOptions
}

// Node is one lab node and its dataplane.
type Node struct {
	Node    *netlab.Node
	Env     flannel.Env
	Backend flannel.Backend
	Net     flannel.Network
	Lease   lease.Lease
	Pod     *netlab.Pod
	// Logs holds what the node's backend logged (Env.Logger).
	Logs *testenv.LogBuffer
}

// NewCluster builds the lab, finds each node's external interface with
// backend.FindInterface, prepares and starts a Network per node with the
// lease 10.244.<i>.0/24 and/or fd00:10:244:<i>::/64 (the attributes
// Prepare returned) and adds one pod per node with the Network's MTU. No
// peer is applied yet.
func NewCluster(t *testing.T, opts ClusterOptions) *Cluster {
	t.Helper()
	lab := netlab.NewT(t, opts.Lab)
	c := &Cluster{Lab: lab, V4: opts.Lab.IPv4 || !opts.Lab.IPv6, V6: opts.Lab.IPv6, opts: opts}
	for i, n := range lab.Nodes {
		env := c.Env(t, n)
		nd := &Node{Node: n, Env: env, Logs: &testenv.LogBuffer{}}
		nd.Backend = opts.New(t, i)
		nd.Lease = c.Start(t, nd, i)
		pod, err := n.AddPod("pod", nd.Lease.Subnet, nd.Lease.IPv6Subnet, netlab.WithMTU(nd.Net.MTU()))
		require.NoError(t, err)
		nd.Pod = pod
		c.Nodes = append(c.Nodes, nd)
	}
	return c
}

// Env is the environment of lab node n: its external interface, handle,
// namespace (unless NoNS), and the cluster's families and networks
// (10.244.0.0/16 and fd00:10:244::/56, where node i leases
// 10.244.<i>.0/24 and fd00:10:244:<i>::/64).
func (c *Cluster) Env(t *testing.T, n *netlab.Node) flannel.Env {
	t.Helper()
	iface, err := backend.FindInterface(n.Handle, backend.InterfaceOptions{IPv4: c.V4, IPv6: c.V6})
	require.NoError(t, err)
	require.Equal(t, netlab.UnderlayIface, iface.Name)
	env := flannel.Env{
		Config: lease.Config{
			EnableIPv4: c.V4, EnableIPv6: c.V6, BackendType: c.opts.Type,
			Network: netip.MustParsePrefix("10.244.0.0/16"), SubnetLen: 24,
			IPv6Network: netip.MustParsePrefix("fd00:10:244::/56"), IPv6SubnetLen: 64,
		},
		Iface:  iface,
		Handle: n.Handle,
		NS:     n.NS,
	}
	if c.opts.NoNS {
		env.NS = netns.None()
	}
	return env
}

// Start prepares nd.Backend in nd.Env (with nd.Logs as its logger and
// nd.Lease as the previous lease), starts the Network for node i's subnets
// and stores it in nd.Net. It returns the Network's lease: the prepared
// attributes, or those Start published instead.
func (c *Cluster) Start(t *testing.T, nd *Node, i int) lease.Lease {
	t.Helper()
	if nd.Logs == nil {
		nd.Logs = &testenv.LogBuffer{}
	}
	ctx := context.Background()
	env := nd.Env
	env.Logger = nd.Logs.Logger().With("node", nd.Node.Name)
	env.Previous = nd.Lease
	attrs, err := nd.Backend.Prepare(ctx, env)
	require.NoError(t, err)
	l := lease.Lease{Attrs: attrs}
	if c.V4 {
		l.Subnet = netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", i))
	}
	if c.V6 {
		l.IPv6Subnet = netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%d::/64", i))
	}
	nw, err := nd.Backend.Start(ctx, l)
	require.NoError(t, err)
	nd.Net = nw
	return nw.Lease() // with what Start published, if anything (ipsec binds its key to the lease)
}

// Leases is every node's lease, as a store snapshot has them.
func (c *Cluster) Leases() []lease.Lease {
	var ls []lease.Lease
	for _, n := range c.Nodes {
		ls = append(ls, n.Lease)
	}
	return ls
}

// ApplyAll applies the full lease set (own lease included) on every node.
func (c *Cluster) ApplyAll(t *testing.T) {
	t.Helper()
	for _, n := range c.Nodes {
		require.NoError(t, n.Net.Apply(context.Background(), c.Leases()), "apply on %s", n.Node.Name)
	}
}

// CheckPair pings and TCP-checks from a's pod to b's pod on every family.
func (c *Cluster) CheckPair(t *testing.T, a, b *Node) {
	t.Helper()
	for _, dst := range []netip.Addr{b.Pod.IP, b.Pod.IPv6} {
		if !dst.IsValid() {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), CheckTimeout)
		assert.NoError(t, a.Pod.Ping(ctx, dst), "ping %s -> %s", a.Node.Name, dst)
		assert.NoError(t, a.Pod.TCPCheck(ctx, b.Pod, dst), "tcp %s -> %s", a.Node.Name, dst)
		cancel()
	}
}

// CheckAll checks every ordered pair of nodes, in parallel. Each pair is
// first reached one way only (the pairs in parallel): a dataplane whose
// first packet starts a handshake (WireGuard) must not be made to start
// it from both ends at once, since two crossing initiations cancel each
// other and leave the pair silent until the protocol retries 5 s later,
// under load again and again.
func (c *Cluster) CheckAll(t *testing.T) {
	t.Helper()
	var wg sync.WaitGroup
	for i, a := range c.Nodes {
		for _, b := range c.Nodes[i+1:] {
			wg.Go(func() { c.CheckPair(t, a, b) })
		}
	}
	wg.Wait()
	for i, a := range c.Nodes {
		for j, b := range c.Nodes {
			if i > j {
				wg.Go(func() { c.CheckPair(t, a, b) })
			}
		}
	}
	wg.Wait()
}

// Unreachable asserts a's pod cannot reach dst within a second.
func Unreachable(t *testing.T, a *Node, dst netip.Addr) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	assert.Error(t, a.Pod.Ping(ctx, dst), "ping %s -> %s should fail", a.Node.Name, dst)
}

// RunNetwork runs n.Net.Run until the test ends (or the returned stop is
// called) and checks that it returned nil.
func RunNetwork(t *testing.T, n *Node) (stop func()) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n.Net.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				assert.NoError(t, err, "Run on %s", n.Node.Name)
			case <-time.After(CheckTimeout):
				t.Errorf("Run on %s did not return after cancel", n.Node.Name)
			}
		})
	}
	t.Cleanup(stop) // on failure too, before the lab goes
	return stop
}

// NodeName is the name under /run/netns of the namespace ns (a netlab
// node's), for fixtures that keep a node's files (a key, a state
// directory) across a restart of its backend. Names are unique per lab,
// unlike a namespace's inode, which the kernel hands to a new namespace
// once the old one is gone (a later node of another test would then find
// the files of a dead one).
func NodeName(t *testing.T, ns netns.NsHandle) string {
	t.Helper()
	var want unix.Stat_t
	require.NoError(t, unix.Fstat(int(ns), &want))
	entries, err := os.ReadDir("/run/netns")
	require.NoError(t, err)
	for _, e := range entries {
		var st unix.Stat_t
		if unix.Stat(filepath.Join("/run/netns", e.Name()), &st) == nil && st.Dev == want.Dev && st.Ino == want.Ino {
			return e.Name()
		}
	}
	t.Fatalf("no namespace under /run/netns is the node's (inode %d)", want.Ino)
	return ""
}
