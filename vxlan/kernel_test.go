package vxlan

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
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

	"github.com/flannelkit/flannel/internal/backendtest"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/lease"
)

func TestCustomVNIPortGBP(t *testing.T) {
	t.Parallel()
	c := newCluster(t, netlab.Options{Nodes: 2, IPv4: true, IPv6: true}, Options{VNI: 4242, Port: 4789, GBP: true, MTU: 1400})
	c.ApplyAll(t)
	n0 := c.Nodes[0]
	for _, v6 := range []bool{false, true} {
		name := deviceName(4242, v6)
		l, err := n0.Node.Handle.LinkByName(name)
		require.NoError(t, err, name)
		v := l.(*netlink.Vxlan)
		assert.Equal(t, 4242, v.VxlanId)
		assert.Equal(t, 4789, v.Port)
		assert.True(t, v.GBP)
		assert.False(t, v.Learning)
		assert.Equal(t, n0.Env.Iface.Index, v.VtepDevIndex)
		if v6 {
			assert.Equal(t, 1400-70, v.MTU)
			assert.Equal(t, n0.Node.IPv6, ipconv.AddrFromIP(v.SrcAddr))
		} else {
			assert.Equal(t, 1400-50, v.MTU)
			assert.Equal(t, n0.Node.IP, ipconv.AddrFromIP(v.SrcAddr))
		}
	}
	assert.Equal(t, 1330, nw(n0).MTU())
	for _, raw := range [][]byte{n0.Lease.Attrs.BackendData, n0.Lease.Attrs.BackendV6Data} {
		d, err := ParseBackendData(raw)
		require.NoError(t, err)
		assert.Equal(t, 4242, d.VNI)
		assert.Contains(t, string(raw), `{"VNI":4242,"VtepMAC":"`)
	}
	// accept_ra off on the IPv6 device.
	v, err := nlsafe.GetSysctl(n0.Node.NS, "net/ipv6/conf/"+deviceName(4242, true)+"/accept_ra")
	require.NoError(t, err)
	assert.Equal(t, "0", v)
	c.CheckAll(t)
}

func TestDeviceReuseAndReplace(t *testing.T) {
	t.Parallel()
	lab := netlab.NewT(t, netlab.Options{Nodes: 1})
	c := &backendtest.Cluster{Lab: lab, V4: true}
	n := lab.Nodes[0]
	env := c.Env(t, n)
	mac, _ := net.ParseMAC("0a:58:0a:f4:00:01")
	tests := []struct {
		name    string
		link    *netlink.Vxlan
		reused  bool
		keepMAC bool
	}{
		{name: "matching", reused: true, keepMAC: true, link: &netlink.Vxlan{VxlanId: 1, Port: 8472}},
		{name: "other port", keepMAC: true, link: &netlink.Vxlan{VxlanId: 1, Port: 4789}},
		{name: "learning", keepMAC: true, link: &netlink.Vxlan{VxlanId: 1, Port: 8472, Learning: true}},
		{name: "gbp", keepMAC: true, link: &netlink.Vxlan{VxlanId: 1, Port: 8472, GBP: true}},
		{name: "other vni", keepMAC: true, link: &netlink.Vxlan{VxlanId: 9, Port: 8472}},
		{name: "no local", keepMAC: true, link: &netlink.Vxlan{VxlanId: 1, Port: 8472}},
		{name: "not vxlan", link: nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if old, err := n.Handle.LinkByName("flannel.1"); err == nil {
				require.NoError(t, n.Handle.LinkDel(old))
			}
			var pre netlink.Link
			if tc.link != nil {
				v := *tc.link
				v.LinkAttrs = netlink.LinkAttrs{Name: "flannel.1", HardwareAddr: mac, MTU: 1450}
				v.VtepDevIndex = env.Iface.Index
				if tc.name != "no local" {
					v.SrcAddr = ipconv.IPFromAddr(n.IP)
				}
				pre = &v
			} else {
				pre = &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "flannel.1"}}
			}
			require.NoError(t, n.Handle.LinkAdd(pre))
			before, err := n.Handle.LinkByName("flannel.1")
			require.NoError(t, err)
			b, err := New(Options{})
			require.NoError(t, err)
			attrs, err := b.Prepare(context.Background(), env)
			require.NoError(t, err)
			after, err := n.Handle.LinkByName("flannel.1")
			require.NoError(t, err)
			assert.Equal(t, tc.reused, before.Attrs().Index == after.Attrs().Index, "same ifindex")
			assert.Equal(t, tc.keepMAC, after.Attrs().HardwareAddr.String() == mac.String(), "same MAC")
			assert.Contains(t, string(attrs.BackendData), after.Attrs().HardwareAddr.String())
			assert.Empty(t, (devSpec{name: "flannel.1", vni: 1, port: 8472, local: n.IP, extIndex: env.Iface.Index}).mismatch(after))
			assert.NotZero(t, after.Attrs().Flags&net.FlagUp)
		})
	}
}

// TestDirectRouting puts nodes 0 and 2 on segment 0 and nodes 1 and 3 on
// segment 1: same-segment peers get direct routes on eth0, the others go
// through the VXLAN device.
func TestDirectRouting(t *testing.T) {
	t.Parallel()
	c := newCluster(t, netlab.Options{Nodes: 4, IPv4: true, IPv6: true, Segments: 2}, Options{DirectRouting: true})
	c.ApplyAll(t)
	for _, n := range c.Nodes {
		same := func(p *backendtest.Node) bool { return p.Node.Segment == n.Node.Segment }
		assert.Equal(t, want(c, n, same, c.Nodes...), state(t, n), "entries on %s", n.Node.Name)
	}
	c.CheckAll(t)
}

// TestRepairKeepsMAC: Run recreates deleted devices with their MACs (the
// contract suite checks the entries come back) and traffic recovers.
func TestRepairKeepsMAC(t *testing.T) {
	c := newCluster(t, netlab.Options{Nodes: 2, IPv4: true, IPv6: true}, Options{RepairInterval: time.Hour})
	n0, n1 := c.Nodes[0], c.Nodes[1]
	backendtest.RunNetwork(t, n0)
	c.ApplyAll(t)
	want := want(c, n0, nil, n1)
	require.Equal(t, want, state(t, n0))
	mac4, mac6 := nw(n0).VtepMAC(false), nw(n0).VtepMAC(true)
	h := n0.Node.Handle
	dev4, err := h.LinkByName("flannel.1")
	require.NoError(t, err)
	for _, name := range []string{"flannel.1", "flannel-v6.1"} {
		l, err := h.LinkByName(name)
		require.NoError(t, err)
		require.NoError(t, h.LinkDel(l))
	}
	require.Eventually(t, func() bool { return slices.Equal(want, state(t, n0)) }, 30*time.Second, 20*time.Millisecond, "devices restored")
	l, err := h.LinkByName("flannel.1")
	require.NoError(t, err)
	assert.NotEqual(t, dev4.Attrs().Index, l.Attrs().Index, "recreated")
	assert.Equal(t, mac4, l.Attrs().HardwareAddr, "same MAC after recreation")
	assert.NotZero(t, l.Attrs().Flags&net.FlagUp, "up")
	assert.Equal(t, mac4, nw(n0).VtepMAC(false))
	assert.Equal(t, mac6, nw(n0).VtepMAC(true))
	c.CheckPair(t, n0, n1)
	c.CheckPair(t, n1, n0)
}

// TestMACStable: a new Backend (an agent restart) reuses the device's MAC;
// the same Backend recreating a deleted device reuses its MAC; a pinned MAC
// is used when there is no device.
func TestMACStable(t *testing.T) {
	t.Parallel()
	c := newCluster(t, netlab.Options{Nodes: 1, IPv4: true, IPv6: true}, Options{})
	n := c.Nodes[0]
	mac4, mac6 := nw(n).VtepMAC(false), nw(n).VtepMAC(true)
	assert.Equal(t, byte(2), mac4[0]&3, "locally administered unicast")
	ctx := context.Background()

	b2, err := New(Options{})
	require.NoError(t, err)
	attrs, err := b2.Prepare(ctx, n.Env)
	require.NoError(t, err)
	assert.Equal(t, n.Lease.Attrs.BackendData, attrs.BackendData, "restart keeps the v4 MAC")
	assert.Equal(t, n.Lease.Attrs.BackendV6Data, attrs.BackendV6Data, "restart keeps the v6 MAC")

	require.NoError(t, b2.Cleanup(ctx, n.Env))
	_, err = n.Node.Handle.LinkByName("flannel.1")
	require.Error(t, err, "cleanup deleted the device")
	attrs, err = b2.Prepare(ctx, n.Env)
	require.NoError(t, err)
	assert.Equal(t, n.Lease.Attrs.BackendData, attrs.BackendData, "recreation keeps the MAC")
	nw, err := b2.Start(ctx, n.Lease)
	require.NoError(t, err)
	assert.Equal(t, mac4, nw.(*Network).VtepMAC(false))
	assert.Equal(t, mac6, nw.(*Network).VtepMAC(true))

	pin, _ := net.ParseMAC("0e:00:00:00:00:01")
	require.NoError(t, b2.Cleanup(ctx, n.Env))
	b3, err := New(Options{VtepMAC: pin})
	require.NoError(t, err)
	attrs, err = b3.Prepare(ctx, n.Env)
	require.NoError(t, err)
	assert.Contains(t, string(attrs.BackendData), pin.String())
}

func TestDisableTXChecksum(t *testing.T) {
	t.Parallel()
	c := newCluster(t, netlab.Options{Nodes: 1}, Options{})
	n := c.Nodes[0]
	on, err := txChecksum(n.Node.NS, "flannel.1")
	require.NoError(t, err)
	assert.True(t, on, "the kernel's default is left alone")
	b, err := New(Options{DisableTXChecksum: true})
	require.NoError(t, err)
	_, err = b.Prepare(context.Background(), n.Env)
	require.NoError(t, err)
	on, err = txChecksum(n.Node.NS, "flannel.1")
	require.NoError(t, err)
	assert.False(t, on)
}

// TestApplyStates replays random peer sets (peers moving to other public
// IPs and MACs), in key order or shuffled, and checks after each that the kernel
// holds exactly the entries of that set.
func TestApplyStates(t *testing.T) {
	t.Parallel()
	c := newCluster(t, netlab.Options{Nodes: 1, IPv4: true, IPv6: true}, Options{})
	n0 := c.Nodes[0]
	for _, useHandle := range []bool{false, true} {
		if useHandle {
			nw(n0).env.NS = netns.None() // programs through the handle
		}
		rng := rand.New(rand.NewPCG(1, 2))
		for step := range 25 {
			var set []lease.Lease
			var want []string
			for k := 1; k <= 8; k++ {
				if rng.IntN(2) == 0 {
					continue
				}
				ip := netip.MustParseAddr(fmt.Sprintf("172.30.0.%d", 100+k+rng.IntN(2)*50))
				ip6 := netip.MustParseAddr(fmt.Sprintf("fd00:172:30::%d", 100+k+rng.IntN(2)*50))
				mac := fmt.Sprintf("0a:00:00:00:%02x:%02x", k, rng.IntN(3))
				l := lease.Lease{
					Subnet:     netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", 100+k)),
					IPv6Subnet: netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%d::/64", 100+k)),
					Attrs: lease.Attrs{BackendType: Type, PublicIP: ip, PublicIPv6: ip6,
						BackendData:   []byte(`{"VNI":1,"VtepMAC":"` + mac + `"}`),
						BackendV6Data: []byte(`{"VNI":1,"VtepMAC":"` + mac + `"}`)},
				}
				set = append(set, l)
				for _, f := range []struct {
					dev    string
					subnet netip.Prefix
					public netip.Addr
				}{{"flannel.1", l.Subnet, ip}, {"flannel-v6.1", l.IPv6Subnet, ip6}} {
					want = append(want,
						fmt.Sprintf("fdb %s %s dst %s", f.dev, mac, f.public),
						fmt.Sprintf("neigh %s %s %s", f.dev, f.subnet.Addr(), mac),
						fmt.Sprintf("route %s %s via %s onlink", f.dev, f.subnet, f.subnet.Addr()))
				}
			}
			// Odd steps keep the key order, as a store hands peers: the
			// incremental path then finds memos by walking the last order
			// (peers inserted, removed and changed among them); even steps
			// shuffle, so it must look them up.
			if step%2 == 0 {
				rng.Shuffle(len(set), func(i, j int) { set[i], set[j] = set[j], set[i] })
			}
			slices.Sort(want)
			if step%3 == 0 {
				nw(n0).r.Locked(func() { nw(n0).synced = false }) // the full path (dump and diff) this time
			}
			require.NoError(t, nw(n0).Apply(context.Background(), append(set, n0.Lease)), "step %d", step)
			require.Equal(t, want, state(t, n0), "step %d (handle %t)", step, useHandle)
		}
	}
}

func TestBadPeers(t *testing.T) {
	t.Parallel()
	c := newCluster(t, netlab.Options{Nodes: 2}, Options{})
	n0, n1 := c.Nodes[0], c.Nodes[1]
	bad := n1.Lease
	bad.Subnet = netip.MustParsePrefix("10.244.50.0/24")
	bad.Attrs.BackendData = []byte(`{"VNI":1}`)
	other := n1.Lease
	other.Subnet = netip.MustParsePrefix("10.244.51.0/24")
	other.Attrs.BackendType = "host-gw"
	err := nw(n0).Apply(context.Background(), []lease.Lease{n0.Lease, n1.Lease, bad, other})
	require.Error(t, err)
	assert.ErrorContains(t, err, "peer 10.244.50.0/24")
	assert.ErrorContains(t, err, "no VtepMAC")
	assert.Equal(t, want(c, n0, nil, n1), state(t, n0), "the good peer is programmed, the other backend skipped")
}

func TestRunSurvivesSubscriptionFailure(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	c := newCluster(t, netlab.Options{Nodes: 2}, Options{RepairInterval: 50 * time.Millisecond})
	n0, n1 := c.Nodes[0], c.Nodes[1]
	// Open but not a namespace: every subscribe attempt fails (setns
	// EINVAL), and so do raw sockets: programming falls back to the handle.
	f, err := os.Open(os.DevNull)
	require.NoError(t, err)
	t.Cleanup(func() { f.Close() })
	nw(n0).env.NS = netns.NsHandle(int(f.Fd()))
	var logs testenv.LogBuffer
	nw(n0).log = slog.New(slog.NewTextHandler(&logs, nil))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- nw(n0).Run(ctx) }()
	require.NoError(t, nw(n0).Apply(context.Background(), c.Leases()))
	want := want(c, n0, nil, n1)
	require.Equal(t, want, state(t, n0))
	dev, err := n0.Node.Handle.LinkByName("flannel.1")
	require.NoError(t, err)
	require.NoError(t, n0.Node.Handle.RouteDel(&netlink.Route{LinkIndex: dev.Attrs().Index, Dst: ipconv.IPNetFromPrefix(n1.Lease.Subnet)}))
	require.Eventually(t, func() bool { return slices.Equal(want, state(t, n0)) }, 30*time.Second, 20*time.Millisecond, "restored by the timer")
	require.Eventually(t, func() bool { return strings.Contains(logs.String(), "link subscription failed") }, 30*time.Second, 20*time.Millisecond)
	cancel()
	require.NoError(t, <-done)
	goleak.VerifyNone(t, ignore)
}

// TestManyPeersParallelSockets programs and then removes 600 peers
// through three raw sockets in parallel.
func TestManyPeersParallelSockets(t *testing.T) {
	t.Parallel()
	c := newCluster(t, netlab.Options{Nodes: 1}, Options{Sockets: 3})
	n0 := c.Nodes[0]
	var peers []lease.Lease
	for k := 1; k <= 600; k++ {
		peers = append(peers, lease.Lease{
			Subnet: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 100 + byte(k>>8), byte(k), 0}), 24),
			Attrs: lease.Attrs{BackendType: Type, PublicIP: netip.AddrFrom4([4]byte{100, 64, byte(k >> 8), byte(k)}),
				BackendData: []byte(fmt.Sprintf(`{"VNI":1,"VtepMAC":"0a:00:00:00:%02x:%02x"}`, k>>8, k&255))},
		})
	}
	count := func() map[string]int {
		m := map[string]int{}
		for _, s := range state(t, n0) {
			m[strings.Fields(s)[0]]++
		}
		return m
	}
	require.NoError(t, nw(n0).Apply(context.Background(), append(peers, n0.Lease)))
	assert.Equal(t, map[string]int{"fdb": 600, "neigh": 600, "route": 600}, count())
	nw(n0).r.Locked(func() { nw(n0).synced = false }) // remove them through the full path
	require.NoError(t, nw(n0).Apply(context.Background(), []lease.Lease{n0.Lease}))
	assert.Empty(t, count())
}

// TestRunManyPeersKeepsSubscriptions: programming thousands of peers at
// once emits as many netlink notifications; the watches' sockets must hold
// them (an overflow ends a subscription and costs a full repair).
func TestRunManyPeersKeepsSubscriptions(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	c := newCluster(t, netlab.Options{Nodes: 2}, Options{RepairInterval: time.Hour})
	n0, n1 := c.Nodes[0], c.Nodes[1]
	var logs testenv.LogBuffer
	nw(n0).log = slog.New(slog.NewTextHandler(&logs, nil))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- nw(n0).Run(ctx) }()
	defer func() {
		cancel()
		require.NoError(t, <-done)
		goleak.VerifyNone(t, ignore)
	}()
	require.NoError(t, nw(n0).Apply(context.Background(), c.Leases()))
	dev, err := n0.Node.Handle.LinkByName("flannel.1")
	require.NoError(t, err)
	want := want(c, n0, nil, n1)
	// The route and neighbour watches are up once an entry deleted by hand
	// comes back (the periodic repair is an hour away).
	require.NoError(t, n0.Node.Handle.RouteDel(&netlink.Route{LinkIndex: dev.Attrs().Index, Dst: ipconv.IPNetFromPrefix(n1.Lease.Subnet)}))
	require.Eventually(t, func() bool { return slices.Equal(want, state(t, n0)) }, 30*time.Second, 20*time.Millisecond, "route restored by an event")
	require.NoError(t, n0.Node.Handle.NeighDel(&netlink.Neigh{LinkIndex: dev.Attrs().Index, IP: ipconv.IPFromAddr(netip.AddrFrom4(n1.Lease.Subnet.Addr().As4())), Family: netlink.FAMILY_V4}))
	require.Eventually(t, func() bool { return slices.Equal(want, state(t, n0)) }, 30*time.Second, 20*time.Millisecond, "neighbour restored by an event")

	peers := c.Leases()
	for k := 1; k <= 4000; k++ {
		peers = append(peers, lease.Lease{
			Subnet: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 100 + byte(k>>8), byte(k), 0}), 24),
			Attrs: lease.Attrs{BackendType: Type, PublicIP: netip.AddrFrom4([4]byte{100, 64, byte(k >> 8), byte(k)}),
				BackendData: []byte(fmt.Sprintf(`{"VNI":1,"VtepMAC":"0a:00:00:00:%02x:%02x"}`, k>>8, k&255))},
		})
	}
	require.NoError(t, nw(n0).Apply(context.Background(), peers))
	// Still subscribed: an entry deleted by hand comes back by an event.
	require.NoError(t, n0.Node.Handle.RouteDel(&netlink.Route{LinkIndex: dev.Attrs().Index, Dst: ipconv.IPNetFromPrefix(n1.Lease.Subnet)}))
	require.Eventually(t, func() bool {
		rs, err := nlsafe.Wrap(n0.Node.Handle).RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{LinkIndex: dev.Attrs().Index, Dst: ipconv.IPNetFromPrefix(n1.Lease.Subnet)}, netlink.RT_FILTER_OIF|netlink.RT_FILTER_DST)
		return err == nil && len(rs) == 1
	}, 30*time.Second, 20*time.Millisecond, "route restored by an event after the burst")
	assert.NotContains(t, logs.String(), "subscription ended", "a watch lost its subscription during the burst")
}
