package ipip_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"go.uber.org/goleak"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/ipip"
	"github.com/flannelkit/flannel/lease"
)

// TestInVMReachability builds 3 nodes on two L2 segments behind a router,
// with and without DirectRouting: every pod reaches every other, the
// device is right, the routes are the expected ones, and on the wire
// between the two nodes of segment 0 pod traffic is IPIP without
// DirectRouting and plain with it.
func TestInVMReachability(t *testing.T) {
	inVM(t)
	for _, direct := range []bool{false, true} {
		t.Run(map[bool]string{false: "tunnel", true: "direct routing"}[direct], func(t *testing.T) {
			c := newCluster(t, 3, ipip.Options{DirectRouting: direct})
			c.applyAll()
			for _, v := range c.nodes {
				checkDevice(t, v)
				assert.Equal(t, 1480, v.net.MTU())
				assert.Equal(t, c.wantOurs(v, direct), ours(t, v), v.node.Name)
			}
			c.checkAllPairs()

			n0, n2 := c.nodes[0], c.nodes[2]
			require.Equal(t, n0.node.Segment, n2.node.Segment)
			cnt := countFrames(t, c.lab)
			c.checkPair(n0, n2)
			cnt.stop()
			if direct {
				assert.Zero(t, cnt.ipip.Load(), "same segment: no tunnel")
				assert.NotZero(t, cnt.icmp.Load(), "plain ICMP on the wire")
			} else {
				assert.NotZero(t, cnt.ipip.Load(), "IPIP on the wire")
				assert.Zero(t, cnt.icmp.Load(), "no plain ICMP between the nodes")
			}
			// Apply is level-triggered: the same peers change nothing.
			before := ours(t, n0)
			require.NoError(t, n0.net.Apply(t.Context(), c.leases()))
			assert.Equal(t, before, ours(t, n0))
		})
	}
}

// checkDevice checks flannel.ipip on v: ipip, local = the node's address,
// no remote, MTU 1480, up, the lease's address as /32 only.
func checkDevice(t *testing.T, v *vnode) {
	t.Helper()
	l, err := v.node.Handle.LinkByName(ipip.DeviceName)
	require.NoError(t, err)
	tun, ok := l.(*netlink.Iptun)
	require.True(t, ok, "type %s", l.Type())
	assert.Equal(t, "ipip", l.Type())
	assert.Equal(t, v.node.IP, backend.AddrFromIP(tun.Local))
	assert.True(t, tun.Remote == nil || tun.Remote.IsUnspecified(), "remote %v", tun.Remote)
	assert.Equal(t, 1480, l.Attrs().MTU)
	assert.NotZero(t, l.Attrs().RawFlags&1, "up")
	addrs, err := backend.ListAddrs(v.node.Handle, l, netlink.FAMILY_V4)
	require.NoError(t, err)
	require.Len(t, addrs, 1)
	assert.Equal(t, netip.PrefixFrom(v.lease.Subnet.Addr(), 32).String(), addrs[0].IPNet.String())
}

// TestInVMRepair runs node 0's Network and breaks it: a route of ours
// deleted, the device set down, the device deleted (recreated with its
// address, every route replayed); a stale route of a gone peer goes at the
// next Apply, and a device with another local address is replaced.
func TestInVMRepair(t *testing.T) {
	inVM(t)
	ignore := goleak.IgnoreCurrent()
	c := newCluster(t, 3, ipip.Options{DirectRouting: true, RepairInterval: time.Hour})
	c.applyAll()
	v := c.nodes[0]
	want := c.wantOurs(v, true)
	done := make(chan error, 1)
	ctx, cancel := context.WithCancel(t.Context())
	go func() { done <- v.net.Run(ctx) }()
	restored := func(what string) {
		t.Helper()
		require.Eventually(t, func() bool { return assert.ObjectsAreEqual(want, ours(t, v)) }, 60*time.Second, 20*time.Millisecond, what)
		checkDevice(t, v)
	}
	for _, p := range c.nodes[1:] {
		r := netlink.Route{Dst: backend.IPNetFromPrefix(p.lease.Subnet), Protocol: backend.RouteProtocol}
		require.NoError(t, v.node.Handle.RouteDel(&r))
	}
	restored("routes deleted by hand")

	l, err := v.node.Handle.LinkByName(ipip.DeviceName)
	require.NoError(t, err)
	require.NoError(t, v.node.Handle.LinkSetDown(l))
	restored("device set down")

	l, err = v.node.Handle.LinkByName(ipip.DeviceName)
	require.NoError(t, err)
	require.NoError(t, v.node.Handle.LinkDel(l))
	restored("device deleted")
	c.checkAllPairs()
	cancel()
	require.NoError(t, <-done)
	goleak.VerifyNone(t, ignore)

	// The agent restarts (same lease): the device is kept, not recreated,
	// and nothing changes before the first Apply. Node 2 left meanwhile:
	// its route goes at that Apply.
	before, err := v.node.Handle.LinkByName(ipip.DeviceName)
	require.NoError(t, err)
	c.start(0)
	after, err := v.node.Handle.LinkByName(ipip.DeviceName)
	require.NoError(t, err)
	assert.Equal(t, before.Attrs().Index, after.Attrs().Index, "device kept across a restart")
	assert.Equal(t, want, ours(t, v), "nothing changed before the first Apply")
	require.NoError(t, v.net.Apply(t.Context(), []lease.Lease{c.nodes[0].lease, c.nodes[1].lease}))
	assert.Equal(t, c.wantOurs(v, true)[:1], ours(t, v), "only the route to node 1 is left")
	c.checkPair(v, c.nodes[1])

	// A device with another local address (the node's address changed) is
	// replaced by the next Prepare.
	l, err = v.node.Handle.LinkByName(ipip.DeviceName)
	require.NoError(t, err)
	require.NoError(t, v.node.Handle.LinkDel(l))
	odd := &netlink.Iptun{LinkAttrs: netlink.LinkAttrs{Name: ipip.DeviceName}, Local: backend.IPFromAddr(netip.MustParseAddr("172.30.0.250"))}
	require.NoError(t, v.node.Handle.LinkAdd(odd))
	c.start(0)
	checkDevice(t, v)
	assert.True(t, v.logs.HasLine("replacing device with mismatching attributes"))
}

// TestInVMCleanup removes the device and the direct routes, and only
// those; it may be called again.
func TestInVMCleanup(t *testing.T) {
	inVM(t)
	c := newCluster(t, 3, ipip.Options{DirectRouting: true})
	c.applyAll()
	v := c.nodes[0]
	require.NotEmpty(t, ours(t, v))
	require.NoError(t, v.b.Cleanup(t.Context(), v.env))
	assert.Empty(t, ours(t, v))
	_, err := v.node.Handle.LinkByName(ipip.DeviceName)
	assert.Error(t, err, "device gone")
	require.NoError(t, v.b.Cleanup(t.Context(), v.env), "again")
}

// TestInVMPeerErrors: a peer without a public IPv4 address is a
// *flannel.PeerError naming it while the others are programmed; leases of
// another backend type are skipped.
func TestInVMPeerErrors(t *testing.T) {
	inVM(t)
	c := newCluster(t, 3, ipip.Options{})
	v := c.nodes[0]
	bad := c.nodes[1].lease
	bad.Attrs.PublicIP = netip.Addr{}
	other := lease.Lease{Subnet: netip.MustParsePrefix("10.244.99.0/24"), Attrs: lease.Attrs{BackendType: "vxlan", PublicIP: c.nodes[1].node.IP}}
	err := v.net.Apply(t.Context(), []lease.Lease{v.lease, bad, c.nodes[2].lease, other})
	var pe *flannel.PeerError
	require.True(t, errors.As(err, &pe), "%v", err)
	assert.Equal(t, bad, pe.Lease)
	assert.ErrorContains(t, err, "no public IPv4 address for subnet 10.244.2.0/24")
	want := c.wantOurs(v, false)
	assert.Equal(t, []string{want[1]}, ours(t, v), "node 2 programmed, the vxlan lease skipped")
}

// TestInVMApplyStates replays random peer sets in random order on one
// node with DirectRouting, peers on its segment and behind the router,
// some moving between the two, and checks after each that the routes are
// exactly those of the set.
func TestInVMApplyStates(t *testing.T) {
	inVM(t)
	c := newCluster(t, 1, ipip.Options{DirectRouting: true})
	v := c.nodes[0]
	rng := rand.New(rand.NewPCG(5, 6))
	for step := range 30 {
		set := []lease.Lease{v.lease}
		var want []string
		for k := 1; k <= 8; k++ {
			if rng.IntN(2) == 0 {
				continue
			}
			l := lease.Lease{Subnet: netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", 100+k)), Attrs: lease.Attrs{BackendType: "ipip"}}
			if rng.IntN(2) == 0 { // on the segment: direct
				l.Attrs.PublicIP = netip.MustParseAddr(fmt.Sprintf("172.30.0.%d", 100+k))
				want = append(want, fmt.Sprintf("%s via %s dev eth0", l.Subnet, l.Attrs.PublicIP))
			} else { // behind the router: tunnel
				l.Attrs.PublicIP = netip.MustParseAddr(fmt.Sprintf("172.30.1.%d", 100+k))
				want = append(want, fmt.Sprintf("%s via %s dev %s onlink", l.Subnet, l.Attrs.PublicIP, ipip.DeviceName))
			}
			set = append(set, l)
		}
		rng.Shuffle(len(set), func(i, j int) { set[i], set[j] = set[j], set[i] })
		slices.Sort(want)
		require.NoError(t, v.net.Apply(t.Context(), set), "step %d", step)
		require.Equal(t, want, ours(t, v), "step %d", step)
	}
}
