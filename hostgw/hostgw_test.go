package hostgw

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net/netip"
	"os"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/lease"
)

// checkTimeout bounds each connectivity check (Ping and TCPCheck retry
// until it ends); generous for a loaded 2-core CI machine.
const checkTimeout = 30 * time.Second

// testNode is one lab node running the host-gw dataplane.
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

// newCluster builds a lab of n nodes, finds each node's external interface
// with backend.FindInterface, prepares and starts a host-gw Network per node
// with the lease 10.244.<i>.0/24 and/or fd00:10:244:<i>::/64 (PublicIP =
// node IP) and adds one pod per node. No routes are applied yet.
func newCluster(t *testing.T, opts netlab.Options, bopts Options) *cluster {
	t.Helper()
	lab := netlab.NewT(t, opts)
	c := &cluster{lab: lab, v4: opts.IPv4 || !opts.IPv6, v6: opts.IPv6}
	ctx := context.Background()
	for i, n := range lab.Nodes {
		iface, err := backend.FindInterface(n.Handle, backend.InterfaceOptions{IPv4: c.v4, IPv6: c.v6})
		require.NoError(t, err)
		require.Equal(t, netlab.UnderlayIface, iface.Name)
		env := flannel.Env{
			Config: lease.Config{EnableIPv4: c.v4, EnableIPv6: c.v6, BackendType: Type},
			Iface:  iface,
			Handle: n.Handle,
			NS:     n.NS,
		}
		b, err := New(bopts)
		require.NoError(t, err)
		attrs, err := b.Prepare(ctx, env)
		require.NoError(t, err)
		assert.Equal(t, Type, attrs.BackendType)
		l := lease.Lease{Attrs: attrs}
		if c.v4 {
			l.Subnet = netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", i))
			assert.Equal(t, n.IP, attrs.PublicIP)
		}
		if c.v6 {
			l.IPv6Subnet = netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%d::/64", i))
			assert.Equal(t, n.IPv6, attrs.PublicIPv6)
		}
		nw, err := b.Start(ctx, l)
		require.NoError(t, err)
		pod, err := n.AddPod("pod", l.Subnet, l.IPv6Subnet)
		require.NoError(t, err)
		c.nodes = append(c.nodes, &testNode{node: n, env: env, backend: b, net: nw.(*Network), lease: l, pod: pod})
	}
	return c
}

func (c *cluster) leases() []lease.Lease {
	var ls []lease.Lease
	for _, n := range c.nodes {
		ls = append(ls, n.lease)
	}
	return ls
}

// applyAll applies the full lease set (own lease included, as a store
// snapshot has it) on every node.
func (c *cluster) applyAll(t *testing.T) {
	t.Helper()
	for _, n := range c.nodes {
		require.NoError(t, n.net.Apply(context.Background(), c.leases()), "apply on %s", n.node.Name)
	}
}

// checkPair pings and TCP-checks from a's pod to b's pod on every family.
func (c *cluster) checkPair(t *testing.T, a, b *testNode) {
	t.Helper()
	var dsts []netip.Addr
	if c.v4 {
		dsts = append(dsts, b.pod.IP)
	}
	if c.v6 {
		dsts = append(dsts, b.pod.IPv6)
	}
	for _, dst := range dsts {
		ctx, cancel := context.WithTimeout(context.Background(), checkTimeout)
		assert.NoError(t, a.pod.Ping(ctx, dst), "ping %s -> %s", a.node.Name, dst)
		assert.NoError(t, a.pod.TCPCheck(ctx, b.pod, dst), "tcp %s -> %s", a.node.Name, dst)
		cancel()
	}
}

// unreachable asserts a's pod cannot reach dst within a short time.
func unreachable(t *testing.T, a *testNode, dst netip.Addr) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	assert.Error(t, a.pod.Ping(ctx, dst), "ping %s -> %s should fail", a.node.Name, dst)
}

// routes renders every route of the node's main table, both families,
// sorted.
func routes(t *testing.T, h *netlink.Handle) []string {
	t.Helper()
	rs, err := backend.ListRoutes(h, netlink.FAMILY_ALL, nil, 0)
	require.NoError(t, err)
	var out []string
	for _, r := range rs {
		out = append(out, fmt.Sprintf("%s metric %d", backend.FormatRoute(r), r.Priority))
	}
	slices.Sort(out)
	return out
}

// ours renders the node's routes with our protocol, sorted.
func ours(t *testing.T, n *testNode) []string {
	t.Helper()
	rs, err := (&backend.RouteReconciler{}).Owned(n.node.Handle, 0)
	require.NoError(t, err)
	var out []string
	for _, r := range rs {
		out = append(out, fmt.Sprintf("%s via %s", r.Dst, r.Gw))
	}
	slices.Sort(out)
	return out
}

// wantOurs is what ours should show on n for peers.
func (c *cluster) wantOurs(n *testNode, peers ...*testNode) []string {
	var out []string
	for _, p := range peers {
		if p == n {
			continue
		}
		if c.v4 {
			out = append(out, fmt.Sprintf("%s via %s", p.lease.Subnet, p.node.IP))
		}
		if c.v6 {
			out = append(out, fmt.Sprintf("%s via %s", p.lease.IPv6Subnet, p.node.IPv6))
		}
	}
	slices.Sort(out)
	return out
}

func addRoute(t *testing.T, h *netlink.Handle, dst string, gw netip.Addr, link int, proto netlink.RouteProtocol) netlink.Route {
	t.Helper()
	r := netlink.Route{
		Dst: backend.IPNetFromPrefix(netip.MustParsePrefix(dst)), Gw: backend.IPFromAddr(gw),
		LinkIndex: link, Protocol: proto,
	}
	require.NoError(t, h.RouteAdd(&r), "add route %s", backend.FormatRoute(r))
	return r
}

func TestPodConnectivity(t *testing.T) {
	tests := []struct {
		name string
		opts netlab.Options
	}{
		{name: "ipv4", opts: netlab.Options{Nodes: 3, IPv4: true}},
		{name: "ipv6", opts: netlab.Options{Nodes: 3, IPv6: true}},
		{name: "dual-stack", opts: netlab.Options{Nodes: 3, IPv4: true, IPv6: true}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c := newCluster(t, tc.opts, Options{})
			for _, n := range c.nodes {
				assert.Equal(t, 1500, n.net.MTU())
				assert.Equal(t, n.lease, n.net.Lease())
			}
			// Before any route, pods on different nodes cannot talk.
			if c.v4 {
				unreachable(t, c.nodes[0], c.nodes[1].pod.IP)
			} else {
				unreachable(t, c.nodes[0], c.nodes[1].pod.IPv6)
			}

			c.applyAll(t)
			for _, n := range c.nodes {
				assert.Equal(t, c.wantOurs(n, c.nodes...), ours(t, n), "routes on %s", n.node.Name)
			}
			for _, a := range c.nodes {
				for _, b := range c.nodes {
					if a != b {
						c.checkPair(t, a, b)
					}
				}
			}

			t.Run("apply twice changes nothing", func(t *testing.T) {
				n := c.nodes[0]
				before := routes(t, n.node.Handle)
				require.NoError(t, n.net.Apply(context.Background(), c.leases()))
				assert.Equal(t, before, routes(t, n.node.Handle))
			})

			t.Run("removed peer loses its route", func(t *testing.T) {
				n0, n1, n2 := c.nodes[0], c.nodes[1], c.nodes[2]
				require.NoError(t, n0.net.Apply(context.Background(), []lease.Lease{n0.lease, n1.lease}))
				assert.Equal(t, c.wantOurs(n0, n1), ours(t, n0))
				c.checkPair(t, n0, n1)
				if c.v4 {
					unreachable(t, n0, n2.pod.IP)
				}
				if c.v6 {
					unreachable(t, n0, n2.pod.IPv6)
				}
				// And back.
				require.NoError(t, n0.net.Apply(context.Background(), c.leases()))
				c.checkPair(t, n0, n2)
			})
		})
	}
}

func TestFirstApplyRemovesStaleRoutesOnly(t *testing.T) {
	c := newCluster(t, netlab.Options{Nodes: 2, IPv4: true, IPv6: true}, Options{})
	n0, n1 := c.nodes[0], c.nodes[1]
	h, idx := n0.node.Handle, n0.env.Iface.Index
	// Left by a previous run for a node that is gone, both families.
	addRoute(t, h, "10.244.99.0/24", n1.node.IP, idx, backend.RouteProtocol)
	addRoute(t, h, "fd00:10:244:99::/64", n1.node.IPv6, idx, backend.RouteProtocol)
	// Not ours, on the same interface.
	addRoute(t, h, "10.244.98.0/24", n1.node.IP, idx, unix.RTPROT_STATIC)
	addRoute(t, h, "fd00:10:244:98::/64", n1.node.IPv6, idx, unix.RTPROT_BOOT)

	vx := lease.Lease{
		Subnet: netip.MustParsePrefix("10.244.50.0/24"),
		Attrs:  lease.Attrs{PublicIP: n1.node.IP, BackendType: "vxlan"},
	}
	require.NoError(t, n0.net.Apply(context.Background(), append(c.leases(), vx)))
	assert.Equal(t, c.wantOurs(n0, n1), ours(t, n0), "stale routes gone, vxlan peer skipped")
	all := routes(t, h)
	assert.Contains(t, all, fmt.Sprintf("10.244.98.0/24 via %s dev %d proto static metric 0", n1.node.IP, idx))
	assert.Contains(t, all, fmt.Sprintf("fd00:10:244:98::/64 via %s dev %d proto boot metric 1024", n1.node.IPv6, idx))
	c.applyAll(t)
	c.checkPair(t, n0, n1)
	c.checkPair(t, n1, n0)

	t.Run("cleanup removes ours only", func(t *testing.T) {
		require.NoError(t, n0.backend.Cleanup(context.Background(), n0.env))
		assert.Empty(t, ours(t, n0))
		all := routes(t, h)
		assert.Contains(t, all, fmt.Sprintf("10.244.98.0/24 via %s dev %d proto static metric 0", n1.node.IP, idx))
		assert.Contains(t, all, fmt.Sprintf("fd00:10:244:98::/64 via %s dev %d proto boot metric 1024", n1.node.IPv6, idx))
		require.NoError(t, n0.backend.Cleanup(context.Background(), n0.env), "again")
		gone := n0.env
		gone.Iface = flannel.ExternalInterface{Name: "nosuch0"}
		require.NoError(t, n0.backend.Cleanup(context.Background(), gone), "interface gone")
	})
}

func TestPeerOnOtherSegment(t *testing.T) {
	// node0 and node2 share segment 0; node1 is on segment 1 behind the
	// router.
	c := newCluster(t, netlab.Options{Nodes: 3, IPv4: true, IPv6: true, Segments: 2}, Options{})
	n0, n1, n2 := c.nodes[0], c.nodes[1], c.nodes[2]
	require.Equal(t, 1, n1.node.Segment)

	err := n0.net.Apply(context.Background(), c.leases())
	require.Error(t, err)
	var pe *flannel.PeerError
	require.True(t, errors.As(err, &pe), "a *flannel.PeerError in %v", err)
	assert.Equal(t, n1.lease, pe.Lease)
	assert.Contains(t, err.Error(), n1.lease.Subnet.String())
	assert.Contains(t, err.Error(), n1.node.IP.String())
	assert.Contains(t, err.Error(), "not directly reachable on eth0")
	var re *backend.RouteError
	assert.True(t, errors.As(err, &re))
	// Exactly one PeerError, holding both families' failures.
	assert.Len(t, err.(interface{ Unwrap() []error }).Unwrap(), 1)
	assert.ErrorIs(t, err, unix.ENETUNREACH)

	assert.Equal(t, c.wantOurs(n0, n2), ours(t, n0), "same-segment peer programmed")
	require.NoError(t, n2.net.Apply(context.Background(), []lease.Lease{n0.lease, n2.lease}))
	c.checkPair(t, n0, n2)
	c.checkPair(t, n2, n0)
}

func TestPeerWithoutPublicAddress(t *testing.T) {
	c := newCluster(t, netlab.Options{Nodes: 2, IPv4: true, IPv6: true}, Options{})
	n0, n1 := c.nodes[0], c.nodes[1]
	bad := n1.lease
	bad.Attrs.PublicIPv6 = netip.Addr{}
	err := n0.net.Apply(context.Background(), []lease.Lease{n0.lease, bad})
	var pe *flannel.PeerError
	require.True(t, errors.As(err, &pe), "%v", err)
	assert.Equal(t, bad, pe.Lease)
	assert.ErrorContains(t, err, "no public IPv6 address for subnet fd00:10:244:1::/64")
	assert.Equal(t, []string{fmt.Sprintf("%s via %s", n1.lease.Subnet, n1.node.IP)}, ours(t, n0), "the IPv4 route is programmed")
}

func TestRunRepairs(t *testing.T) {
	tests := []struct {
		name   string
		opts   Options
		withNS bool
	}{
		// A repair interval far beyond the test: only the route event repairs.
		{name: "on route deleted event", opts: Options{RepairInterval: time.Hour}, withNS: true},
		// No namespace handle: no subscription, the timer repairs.
		{name: "periodically", opts: Options{RepairInterval: 50 * time.Millisecond}, withNS: false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ignore := goleak.IgnoreCurrent()
			c := newCluster(t, netlab.Options{Nodes: 2, IPv4: true, IPv6: true}, tc.opts)
			n0, n1 := c.nodes[0], c.nodes[1]
			if !tc.withNS {
				n0.net.env.NS = netns.None()
			}
			ctx, cancel := context.WithCancel(context.Background())
			runErr := make(chan error, 1)
			go func() { runErr <- n0.net.Run(ctx) }()

			c.applyAll(t)
			want := c.wantOurs(n0, n1)
			require.Equal(t, want, ours(t, n0))
			// Delete our routes by hand, twice over, and wait for repair.
			for range 2 {
				for _, dst := range []string{n1.lease.Subnet.String(), n1.lease.IPv6Subnet.String()} {
					r := netlink.Route{Dst: backend.IPNetFromPrefix(netip.MustParsePrefix(dst)), LinkIndex: n0.env.Iface.Index, Protocol: backend.RouteProtocol}
					require.NoError(t, n0.node.Handle.RouteDel(&r), "delete %s", dst)
				}
				require.Eventually(t, func() bool { return slices.Equal(want, ours(t, n0)) }, 30*time.Second, 20*time.Millisecond, "routes restored")
			}
			c.checkPair(t, n0, n1)

			cancel()
			select {
			case err := <-runErr:
				require.NoError(t, err)
			case <-time.After(30 * time.Second):
				t.Fatal("Run did not return after cancel")
			}
			goleak.VerifyNone(t, ignore)
		})
	}
}

func TestRunWaitsForFirstApply(t *testing.T) {
	c := newCluster(t, netlab.Options{Nodes: 2}, Options{RepairInterval: 20 * time.Millisecond})
	n0, n1 := c.nodes[0], c.nodes[1]
	stale := addRoute(t, n0.node.Handle, "10.244.99.0/24", n1.node.IP, n0.env.Iface.Index, backend.RouteProtocol)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n0.net.Run(ctx) }()
	// Several repair intervals pass; the previous run's route must stay
	// until the caller applies a peer set. (Checked by state, not time:
	// Apply below sees the route still there.)
	deadline := time.Now().Add(200 * time.Millisecond)
	for time.Now().Before(deadline) {
		require.Equal(t, []string{fmt.Sprintf("%s via %s", stale.Dst, stale.Gw)}, ours(t, n0))
		time.Sleep(20 * time.Millisecond)
	}
	require.NoError(t, n0.net.Apply(context.Background(), c.leases()))
	assert.Equal(t, c.wantOurs(n0, n1), ours(t, n0))
	cancel()
	require.NoError(t, <-done)
}

func TestRunSurvivesSubscriptionFailure(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	c := newCluster(t, netlab.Options{Nodes: 2}, Options{RepairInterval: 50 * time.Millisecond})
	n0, n1 := c.nodes[0], c.nodes[1]
	// A descriptor that is open but no namespace: every subscribe attempt
	// fails (setns EINVAL); Run must keep retrying and keep repairing.
	f, err := os.Open(os.DevNull)
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	n0.net.env.NS = netns.NsHandle(int(f.Fd()))
	var logs testenv.LogBuffer
	n0.net.log = slog.New(slog.NewTextHandler(&logs, nil))

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n0.net.Run(ctx) }()
	require.NoError(t, n0.net.Apply(context.Background(), c.leases()))
	r := netlink.Route{Dst: backend.IPNetFromPrefix(n1.lease.Subnet), LinkIndex: n0.env.Iface.Index, Protocol: backend.RouteProtocol}
	require.NoError(t, n0.node.Handle.RouteDel(&r))
	want := c.wantOurs(n0, n1)
	require.Eventually(t, func() bool { return slices.Equal(want, ours(t, n0)) }, 30*time.Second, 20*time.Millisecond, "restored by the timer")
	require.Eventually(t, func() bool { return strings.Contains(logs.String(), "route subscription failed") }, 30*time.Second, 20*time.Millisecond)
	cancel()
	require.NoError(t, <-done)
	goleak.VerifyNone(t, ignore)
}

// TestApplyStates replays random peer sets, in random order, on one node and
// checks after each that the kernel holds exactly the routes of that set
// (tailscale's TestRouterStates idea). The peers' public IPs are unused
// addresses on the node's segment: the kernel only needs them on-link.
func TestApplyStates(t *testing.T) {
	c := newCluster(t, netlab.Options{Nodes: 1, IPv4: true, IPv6: true}, Options{})
	n0 := c.nodes[0]
	var all []lease.Lease
	for k := 1; k <= 8; k++ {
		all = append(all, lease.Lease{
			Subnet:     netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", 100+k)),
			IPv6Subnet: netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%d::/64", 100+k)),
			Attrs: lease.Attrs{
				BackendType: Type,
				PublicIP:    netip.MustParseAddr(fmt.Sprintf("172.30.0.%d", 100+k)),
				PublicIPv6:  netip.MustParseAddr(fmt.Sprintf("fd00:172:30:0::%d", 100+k)),
			},
		})
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for step := range 30 {
		var set []lease.Lease
		var want []string
		for _, l := range all {
			if rng.IntN(2) == 0 {
				continue
			}
			if rng.IntN(4) == 0 { // a peer that moved to another address
				l.Attrs.PublicIP = l.Attrs.PublicIP.Next()
				l.Attrs.PublicIPv6 = l.Attrs.PublicIPv6.Next()
			}
			set = append(set, l)
			want = append(want, fmt.Sprintf("%s via %s", l.Subnet, l.Attrs.PublicIP), fmt.Sprintf("%s via %s", l.IPv6Subnet, l.Attrs.PublicIPv6))
		}
		rng.Shuffle(len(set), func(i, j int) { set[i], set[j] = set[j], set[i] })
		slices.Sort(want)
		require.NoError(t, n0.net.Apply(context.Background(), append(set, n0.lease)), "step %d", step)
		require.Equal(t, want, ours(t, n0), "step %d", step)
	}
}
