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
	"github.com/flannelkit/flannel/internal/backendtest"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/lease"
)

// newCluster builds a host-gw backendtest.Cluster: a lab of the given
// nodes, each with a started Network and one pod. No routes are applied yet.
func newCluster(t *testing.T, opts netlab.Options, bopts Options) *backendtest.Cluster {
	t.Helper()
	return backendtest.NewCluster(t, backendtest.ClusterOptions{Lab: opts, Type: Type, New: func(t *testing.T, _ int) flannel.Backend {
		b, err := New(bopts)
		require.NoError(t, err)
		return b
	}})
}

// nw is n's Network.
func nw(n *backendtest.Node) *Network { return n.Net.(*Network) }

// TestContract runs the dataplane contract suite: its damage is the
// deletion of a peer's routes.
func TestContract(t *testing.T) {
	backendtest.Run(t, backendtest.Fixture{
		Type: Type,
		New: func(t *testing.T, repair time.Duration) flannel.Backend {
			b, err := New(Options{RepairInterval: repair})
			require.NoError(t, err)
			return b
		},
		Dump: ours,
		Damage: []backendtest.Damage{{Name: "routes", Do: func(t *testing.T, n, peer *backendtest.Node) {
			for _, dst := range []netip.Prefix{peer.Lease.Subnet, peer.Lease.IPv6Subnet} {
				r := netlink.Route{Dst: ipconv.IPNetFromPrefix(dst), LinkIndex: n.Env.Iface.Index, Protocol: backend.RouteProtocol}
				require.NoError(t, n.Node.Handle.RouteDel(&r), "delete %s", dst)
			}
		}}},
	})
}

// ours renders the node's routes with our protocol, sorted.
func ours(t *testing.T, n *backendtest.Node) []string {
	t.Helper()
	rs, err := (&backend.RouteReconciler{}).Owned(n.Node.Handle, 0)
	require.NoError(t, err)
	var out []string
	for _, r := range rs {
		out = append(out, fmt.Sprintf("%s via %s", r.Dst, r.Gw))
	}
	slices.Sort(out)
	return out
}

// wantOurs is what ours should show on n for peers.
func wantOurs(c *backendtest.Cluster, n *backendtest.Node, peers ...*backendtest.Node) []string {
	var out []string
	for _, p := range peers {
		if p == n {
			continue
		}
		if c.V4 {
			out = append(out, fmt.Sprintf("%s via %s", p.Lease.Subnet, p.Node.IP))
		}
		if c.V6 {
			out = append(out, fmt.Sprintf("%s via %s", p.Lease.IPv6Subnet, p.Node.IPv6))
		}
	}
	slices.Sort(out)
	return out
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
			for _, n := range c.Nodes {
				assert.Equal(t, 1500, n.Net.MTU())
				assert.Equal(t, n.Lease, n.Net.Lease())
				assert.Equal(t, Type, n.Lease.Attrs.BackendType)
				assert.Equal(t, n.Node.IP, n.Lease.Attrs.PublicIP)
				assert.Equal(t, n.Node.IPv6, n.Lease.Attrs.PublicIPv6)
			}
			// Before any route, pods on different nodes cannot talk.
			if c.V4 {
				backendtest.Unreachable(t, c.Nodes[0], c.Nodes[1].Pod.IP)
			} else {
				backendtest.Unreachable(t, c.Nodes[0], c.Nodes[1].Pod.IPv6)
			}

			c.ApplyAll(t)
			for _, n := range c.Nodes {
				assert.Equal(t, wantOurs(c, n, c.Nodes...), ours(t, n), "routes on %s", n.Node.Name)
			}
			for _, a := range c.Nodes {
				for _, b := range c.Nodes {
					if a != b {
						c.CheckPair(t, a, b)
					}
				}
			}

			t.Run("removed peer loses its route", func(t *testing.T) {
				n0, n1, n2 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
				require.NoError(t, n0.Net.Apply(context.Background(), []lease.Lease{n0.Lease, n1.Lease}))
				assert.Equal(t, wantOurs(c, n0, n1), ours(t, n0))
				c.CheckPair(t, n0, n1)
				if c.V4 {
					backendtest.Unreachable(t, n0, n2.Pod.IP)
				}
				if c.V6 {
					backendtest.Unreachable(t, n0, n2.Pod.IPv6)
				}
				// And back.
				require.NoError(t, n0.Net.Apply(context.Background(), c.Leases()))
				c.CheckPair(t, n0, n2)
			})
		})
	}
}

func TestCleanupMissingInterface(t *testing.T) {
	c := newCluster(t, netlab.Options{Nodes: 1}, Options{})
	n0 := c.Nodes[0]
	gone := n0.Env
	gone.Iface = flannel.ExternalInterface{Name: "nosuch0"}
	require.NoError(t, n0.Backend.Cleanup(context.Background(), gone), "interface gone")
}

func TestPeerOnOtherSegment(t *testing.T) {
	// node0 and node2 share segment 0; node1 is on segment 1 behind the
	// router.
	c := newCluster(t, netlab.Options{Nodes: 3, IPv4: true, IPv6: true, Segments: 2}, Options{})
	n0, n1, n2 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	require.Equal(t, 1, n1.Node.Segment)

	err := n0.Net.Apply(context.Background(), c.Leases())
	require.Error(t, err)
	var pe *flannel.PeerError
	require.True(t, errors.As(err, &pe), "a *flannel.PeerError in %v", err)
	assert.Equal(t, n1.Lease, pe.Lease)
	assert.Contains(t, err.Error(), n1.Lease.Subnet.String())
	assert.Contains(t, err.Error(), n1.Node.IP.String())
	assert.Contains(t, err.Error(), "not directly reachable on eth0")
	var re *backend.RouteError
	assert.True(t, errors.As(err, &re))
	// Exactly one PeerError, holding both families' failures.
	assert.Len(t, err.(interface{ Unwrap() []error }).Unwrap(), 1)
	assert.ErrorIs(t, err, unix.ENETUNREACH)

	assert.Equal(t, wantOurs(c, n0, n2), ours(t, n0), "same-segment peer programmed")
	require.NoError(t, n2.Net.Apply(context.Background(), []lease.Lease{n0.Lease, n2.Lease}))
	c.CheckPair(t, n0, n2)
	c.CheckPair(t, n2, n0)
}

func TestPeerWithoutPublicAddress(t *testing.T) {
	c := newCluster(t, netlab.Options{Nodes: 2, IPv4: true, IPv6: true}, Options{})
	n0, n1 := c.Nodes[0], c.Nodes[1]
	bad := n1.Lease
	bad.Attrs.PublicIPv6 = netip.Addr{}
	err := n0.Net.Apply(context.Background(), []lease.Lease{n0.Lease, bad})
	var pe *flannel.PeerError
	require.True(t, errors.As(err, &pe), "%v", err)
	assert.Equal(t, bad, pe.Lease)
	assert.ErrorContains(t, err, "no public IPv6 address for subnet fd00:10:244:1::/64")
	assert.Equal(t, []string{fmt.Sprintf("%s via %s", n1.Lease.Subnet, n1.Node.IP)}, ours(t, n0), "the IPv4 route is programmed")
}

func TestRunSurvivesSubscriptionFailure(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	c := newCluster(t, netlab.Options{Nodes: 2}, Options{RepairInterval: 50 * time.Millisecond})
	n0, n1 := c.Nodes[0], c.Nodes[1]
	// A descriptor that is open but no namespace: every subscribe attempt
	// fails (setns EINVAL); Run must keep retrying and keep repairing.
	f, err := os.Open(os.DevNull)
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	nw(n0).env.NS = netns.NsHandle(int(f.Fd()))
	var logs testenv.LogBuffer
	nw(n0).log = slog.New(slog.NewTextHandler(&logs, nil))

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n0.Net.Run(ctx) }()
	require.NoError(t, n0.Net.Apply(context.Background(), c.Leases()))
	r := netlink.Route{Dst: ipconv.IPNetFromPrefix(n1.Lease.Subnet), LinkIndex: n0.Env.Iface.Index, Protocol: backend.RouteProtocol}
	require.NoError(t, n0.Node.Handle.RouteDel(&r))
	want := wantOurs(c, n0, n1)
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
	n0 := c.Nodes[0]
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
		require.NoError(t, n0.Net.Apply(context.Background(), append(set, n0.Lease)), "step %d", step)
		require.Equal(t, want, ours(t, n0), "step %d", step)
	}
}

// TestMigrationFromUpstream: a node that upstream flanneld ran left routes
// without a mark (proto boot): to a current peer, and to a peer that is
// gone since. The first Apply makes the first ours and deletes the second;
// routes that are not upstream's shape (another length, outside the
// network, another protocol) stay.
func TestMigrationFromUpstream(t *testing.T) {
	c := newCluster(t, netlab.Options{Nodes: 3, IPv4: true, IPv6: true}, Options{})
	n0, n1, n2 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	add := func(dst string, gw netip.Addr, proto netlink.RouteProtocol) {
		t.Helper()
		r := netlink.Route{Dst: ipconv.IPNetFromPrefix(netip.MustParsePrefix(dst)), Gw: ipconv.IPFromAddr(gw),
			LinkIndex: n0.Env.Iface.Index, Protocol: proto}
		require.NoError(t, n0.Node.Handle.RouteAdd(&r), "add %s", dst)
	}
	// Upstream's shape (netlink without a protocol writes boot).
	add(n1.Lease.Subnet.String(), n1.Node.IP, unix.RTPROT_BOOT)
	add(n1.Lease.IPv6Subnet.String(), n1.Node.IPv6, unix.RTPROT_BOOT)
	add("10.244.77.0/24", n2.Node.IP, unix.RTPROT_BOOT)
	add("fd00:10:244:77::/64", n2.Node.IPv6, unix.RTPROT_BOOT)
	// Not upstream's: kept.
	keep := []string{"10.244.16.0/20", "192.0.2.0/24", "10.244.78.0/24"}
	add(keep[0], n1.Node.IP, unix.RTPROT_BOOT)
	add(keep[1], n1.Node.IP, unix.RTPROT_BOOT)
	add(keep[2], n1.Node.IP, unix.RTPROT_STATIC)

	require.NoError(t, n0.Net.Apply(context.Background(), []lease.Lease{n0.Lease, n1.Lease}))
	assert.Equal(t, wantOurs(c, n0, n1), ours(t, n0), "the current peer's routes are ours now")
	routes := map[string]netlink.RouteProtocol{}
	rs, err := nlsafe.Wrap(n0.Node.Handle).RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{LinkIndex: n0.Env.Iface.Index}, netlink.RT_FILTER_OIF)
	require.NoError(t, err)
	for _, r := range rs {
		if r.Dst != nil {
			routes[r.Dst.String()] = r.Protocol
		}
	}
	assert.NotContains(t, routes, "10.244.77.0/24", "upstream's route to a gone peer is deleted")
	assert.NotContains(t, routes, "fd00:10:244:77::/64", "upstream's IPv6 route to a gone peer is deleted")
	assert.Equal(t, unix.RTPROT_BOOT, int(routes[keep[0]]), "another length stays")
	assert.Equal(t, unix.RTPROT_BOOT, int(routes[keep[1]]), "outside the network stays")
	assert.Equal(t, unix.RTPROT_STATIC, int(routes[keep[2]]), "another protocol stays")
	require.NoError(t, n1.Net.Apply(context.Background(), []lease.Lease{n0.Lease, n1.Lease}))
	c.CheckPair(t, n0, n1)
}

func TestUpstreamRouteShape(t *testing.T) {
	cfg, err := lease.ParseConfig([]byte(`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}`))
	require.NoError(t, err)
	own := lease.Lease{Subnet: netip.MustParsePrefix("10.244.1.0/24"), IPv6Subnet: netip.MustParsePrefix("fd00:10:244:1::/64")}
	adopt := backend.UpstreamRoute(cfg, own)
	gw := ipconv.IPFromAddr(netip.MustParseAddr("192.0.2.2"))
	route := func(dst string, proto netlink.RouteProtocol, mod func(*netlink.Route)) netlink.Route {
		r := netlink.Route{Dst: ipconv.IPNetFromPrefix(netip.MustParsePrefix(dst)), Gw: gw, Protocol: proto, Type: unix.RTN_UNICAST}
		if mod != nil {
			mod(&r)
		}
		return r
	}
	for _, tc := range []struct {
		name string
		r    netlink.Route
		want bool
	}{
		{"upstream v4", route("10.244.7.0/24", unix.RTPROT_BOOT, nil), true},
		{"upstream v6", route("fd00:10:244:7::/64", unix.RTPROT_BOOT, nil), true},
		{"own subnet", route("10.244.1.0/24", unix.RTPROT_BOOT, nil), false},
		{"own v6 subnet", route("fd00:10:244:1::/64", unix.RTPROT_BOOT, nil), false},
		{"ours", route("10.244.7.0/24", backend.RouteProtocol, nil), false},
		{"static", route("10.244.7.0/24", unix.RTPROT_STATIC, nil), false},
		{"kernel", route("10.244.7.0/24", unix.RTPROT_KERNEL, nil), false},
		{"other length", route("10.244.0.0/20", unix.RTPROT_BOOT, nil), false},
		{"outside", route("10.245.7.0/24", unix.RTPROT_BOOT, nil), false},
		{"no gateway", route("10.244.7.0/24", unix.RTPROT_BOOT, func(r *netlink.Route) { r.Gw = nil }), false},
		{"blackhole", route("10.244.7.0/24", unix.RTPROT_BOOT, func(r *netlink.Route) { r.Type = unix.RTN_BLACKHOLE }), false},
	} {
		assert.Equal(t, tc.want, adopt(tc.r), tc.name)
	}
}
