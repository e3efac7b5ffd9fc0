package ipip_test

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/nlsafe"
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
			cnt := countFrames(t, c.lab, n0.node.IP, n2.node.IP, n0.pod.IP, n2.pod.IP)
			c.checkPair(n0, n2)
			cnt.stop()
			if direct {
				assert.Zero(t, cnt.ipip.Load(), "same segment: no tunnel")
				assert.NotZero(t, cnt.icmp.Load(), "plain ICMP on the wire")
			} else {
				assert.NotZero(t, cnt.ipip.Load(), "IPIP on the wire")
				assert.Zero(t, cnt.icmp.Load(), "no plain ICMP between the nodes")
			}
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
	assert.Equal(t, v.node.IP, ipconv.AddrFromIP(tun.Local))
	assert.True(t, tun.Remote == nil || tun.Remote.IsUnspecified(), "remote %v", tun.Remote)
	assert.Equal(t, 1480, l.Attrs().MTU)
	assert.NotZero(t, l.Attrs().RawFlags&1, "up")
	addrs, err := nlsafe.Wrap(v.node.Handle).AddrList(l, netlink.FAMILY_V4)
	require.NoError(t, err)
	require.Len(t, addrs, 1)
	assert.Equal(t, netip.PrefixFrom(v.lease.Subnet.Addr(), 32).String(), addrs[0].IPNet.String())
}

// TestInVMDeviceReplaced: a device with another local address (the
// node's address changed) is replaced by the next Prepare. (Repair, restart
// and Cleanup are the contract suite's: TestInVMContract.)
func TestInVMDeviceReplaced(t *testing.T) {
	inVM(t)
	c := newCluster(t, 1, ipip.Options{})
	v := c.nodes[0]
	l, err := v.node.Handle.LinkByName(ipip.DeviceName)
	require.NoError(t, err)
	require.NoError(t, v.node.Handle.LinkDel(l))
	odd := &netlink.Iptun{LinkAttrs: netlink.LinkAttrs{Name: ipip.DeviceName}, Local: ipconv.IPFromAddr(netip.MustParseAddr("172.30.0.250"))}
	require.NoError(t, v.node.Handle.LinkAdd(odd))
	c.start(0)
	checkDevice(t, v)
	assert.True(t, v.logs.HasLine("replacing device with mismatching attributes"))
}

// TestInVMPeerErrors: a peer without a public IPv4 address is a
// *flannel.PeerError that says so (that it names the peer and the others
// are programmed is the contract suite's).
func TestInVMPeerErrors(t *testing.T) {
	inVM(t)
	c := newCluster(t, 1, ipip.Options{})
	v := c.nodes[0]
	bad := lease.Lease{Subnet: netip.MustParsePrefix("10.244.2.0/24"), Attrs: lease.Attrs{BackendType: ipip.Type}}
	err := v.net.Apply(t.Context(), []lease.Lease{v.lease, bad})
	var pe *flannel.PeerError
	require.True(t, errors.As(err, &pe), "%v", err)
	assert.Equal(t, bad, pe.Lease)
	assert.ErrorContains(t, err, "no public IPv4 address for subnet 10.244.2.0/24")
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
