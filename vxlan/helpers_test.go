package vxlan

import (
	"context"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/lease"
)

// checkTimeout bounds each connectivity check; generous for a loaded CI.
const checkTimeout = 30 * time.Second

type testNode struct {
	node    *netlab.Node
	env     flannel.Env
	backend *Backend
	net     *Network
	lease   lease.Lease
	pod     *netlab.Pod
}

type cluster struct {
	lab    *netlab.Lab
	nodes  []*testNode
	v4, v6 bool
}

// newCluster builds a lab, prepares and starts a vxlan Network per node
// with the lease 10.244.<i>.0/24 and/or fd00:10:244:<i>::/64, and adds one
// pod per node with the network's MTU. No peer is applied yet.
func newCluster(t *testing.T, opts netlab.Options, bopts Options) *cluster {
	t.Helper()
	lab := netlab.NewT(t, opts)
	c := &cluster{lab: lab, v4: opts.IPv4 || !opts.IPv6, v6: opts.IPv6}
	for i, n := range lab.Nodes {
		c.nodes = append(c.nodes, c.startNode(t, i, n, bopts))
	}
	return c
}

func (c *cluster) env(t *testing.T, n *netlab.Node) flannel.Env {
	t.Helper()
	iface, err := backend.FindInterface(n.Handle, backend.InterfaceOptions{IPv4: c.v4, IPv6: c.v6})
	require.NoError(t, err)
	return flannel.Env{
		Config: lease.Config{EnableIPv4: c.v4, EnableIPv6: c.v6, BackendType: Type},
		Iface:  iface,
		Handle: n.Handle,
		NS:     n.NS,
	}
}

func (c *cluster) startNode(t *testing.T, i int, n *netlab.Node, bopts Options) *testNode {
	t.Helper()
	ctx := context.Background()
	env := c.env(t, n)
	b, err := New(bopts)
	require.NoError(t, err)
	attrs, err := b.Prepare(ctx, env)
	require.NoError(t, err)
	l := lease.Lease{Attrs: attrs}
	if c.v4 {
		l.Subnet = netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", i))
	}
	if c.v6 {
		l.IPv6Subnet = netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%d::/64", i))
	}
	nw, err := b.Start(ctx, l)
	require.NoError(t, err)
	pod, err := n.AddPod("pod", l.Subnet, l.IPv6Subnet, netlab.WithMTU(nw.MTU()))
	require.NoError(t, err)
	return &testNode{node: n, env: env, backend: b, net: nw.(*Network), lease: l, pod: pod}
}

func (c *cluster) leases() []lease.Lease {
	var ls []lease.Lease
	for _, n := range c.nodes {
		ls = append(ls, n.lease)
	}
	return ls
}

func (c *cluster) applyAll(t *testing.T) {
	t.Helper()
	for _, n := range c.nodes {
		require.NoError(t, n.net.Apply(context.Background(), c.leases()), "apply on %s", n.node.Name)
	}
}

// checkPair pings and TCP-checks from a's pod to b's pod on every family.
func (c *cluster) checkPair(t *testing.T, a, b *testNode) {
	t.Helper()
	for _, dst := range []netip.Addr{b.pod.IP, b.pod.IPv6} {
		if !dst.IsValid() {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), checkTimeout)
		assert.NoError(t, a.pod.Ping(ctx, dst), "ping %s -> %s", a.node.Name, dst)
		assert.NoError(t, a.pod.TCPCheck(ctx, b.pod, dst), "tcp %s -> %s", a.node.Name, dst)
		cancel()
	}
}

// checkAll checks every ordered pair, in parallel.
func (c *cluster) checkAll(t *testing.T) {
	t.Helper()
	var wg sync.WaitGroup
	for _, a := range c.nodes {
		for _, b := range c.nodes {
			if a != b {
				wg.Go(func() { c.checkPair(t, a, b) })
			}
		}
	}
	wg.Wait()
}

// state renders the kernel entries of n's flannel devices and our routes
// on the external interface, sorted, e.g.
// "fdb flannel.1 aa:.. dst 172.30.0.11", "neigh flannel.1 10.244.1.0 aa:..",
// "route flannel.1 10.244.1.0/24 via 10.244.1.0 onlink",
// "route eth0 10.244.1.0/24 via 172.30.0.11".
func state(t *testing.T, n *testNode) []string {
	t.Helper()
	h := n.node.Handle
	var out []string
	links := map[int]string{n.env.Iface.Index: n.env.Iface.Name}
	for _, d := range n.net.devs {
		l, err := h.LinkByName(d.spec.name)
		if err != nil {
			continue
		}
		idx := l.Attrs().Index
		links[idx] = d.spec.name
		fam := netlink.FAMILY_V4
		if d.spec.v6 {
			fam = netlink.FAMILY_V6
		}
		fdb, err := backend.ListNeighs(h, idx, unix.AF_BRIDGE)
		require.NoError(t, err)
		for _, e := range fdb {
			if e.State&netlink.NUD_PERMANENT != 0 {
				out = append(out, fmt.Sprintf("fdb %s %s dst %s", d.spec.name, e.HardwareAddr, e.IP))
			}
		}
		ns, err := backend.ListNeighs(h, idx, fam)
		require.NoError(t, err)
		for _, e := range ns {
			if e.State&netlink.NUD_PERMANENT != 0 {
				out = append(out, fmt.Sprintf("neigh %s %s %s", d.spec.name, e.IP, e.HardwareAddr))
			}
		}
	}
	rs, err := (&backend.RouteReconciler{}).Owned(h, 0)
	require.NoError(t, err)
	for _, r := range rs {
		s := fmt.Sprintf("route %s %s via %s", links[r.LinkIndex], r.Dst, r.Gw)
		if r.Flags&unix.RTNH_F_ONLINK != 0 {
			s += " onlink"
		}
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

// want renders what state should show on n for peers.
func (c *cluster) want(n *testNode, direct func(p *testNode) bool, peers ...*testNode) []string {
	var out []string
	for _, p := range peers {
		if p == n {
			continue
		}
		for _, v6 := range []bool{false, true} {
			if (v6 && !c.v6) || (!v6 && !c.v4) {
				continue
			}
			subnet, public, dev := p.lease.Subnet, p.node.IP, deviceName(n.backend.opts.VNI, false)
			if v6 {
				subnet, public, dev = p.lease.IPv6Subnet, p.node.IPv6, deviceName(n.backend.opts.VNI, true)
			}
			if direct != nil && direct(p) {
				out = append(out, fmt.Sprintf("route %s %s via %s", n.env.Iface.Name, subnet, public))
				continue
			}
			mac := p.net.VtepMAC(v6)
			out = append(out,
				fmt.Sprintf("fdb %s %s dst %s", dev, mac, public),
				fmt.Sprintf("neigh %s %s %s", dev, subnet.Addr(), mac),
				fmt.Sprintf("route %s %s via %s onlink", dev, subnet, subnet.Addr()))
		}
	}
	slices.Sort(out)
	return out
}

// txPackets is the TX packet counter of a flannel device.
func txPackets(t *testing.T, n *testNode, v6 bool) uint64 {
	t.Helper()
	l, err := n.node.Handle.LinkByName(deviceName(n.backend.opts.VNI, v6))
	require.NoError(t, err)
	return l.Attrs().Statistics.TxPackets
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }
