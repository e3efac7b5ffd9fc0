package netlab_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"go.uber.org/goleak"

	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/internal/testenv"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var (
	podNet0  = netip.MustParsePrefix("10.244.0.0/24")
	podNet1  = netip.MustParsePrefix("10.244.1.0/24")
	podNet60 = netip.MustParsePrefix("fd42:244:0::/64")
	podNet61 = netip.MustParsePrefix("fd42:244:1::/64")
)

func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestTopology(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		opts netlab.Options
	}{
		{"ipv4", netlab.Options{Nodes: 2}},
		{"ipv6", netlab.Options{Nodes: 2, IPv6: true}},
		{"dual", netlab.Options{Nodes: 2, IPv4: true, IPv6: true}},
		{"dual-2-segments", netlab.Options{Nodes: 3, IPv4: true, IPv6: true, Segments: 2, MTU: 1400}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			lab := netlab.NewT(t, tc.opts)
			require.Len(t, lab.Nodes, tc.opts.Nodes)
			segs := max(tc.opts.Segments, 1)
			v4 := tc.opts.IPv4 || !tc.opts.IPv6
			for i, n := range lab.Nodes {
				assert.Equal(t, i%segs, n.Segment)
				assert.Equal(t, "eth0", n.Iface)
				assert.Equal(t, v4, n.IP.IsValid(), "node %s IPv4", n.Name)
				assert.Equal(t, tc.opts.IPv6, n.IPv6.IsValid(), "node %s IPv6", n.Name)
				_, err := os.Stat(filepath.Join("/run/netns", n.NSName))
				assert.NoError(t, err)
				checkNode(t, n, tc.opts)
			}
			// Every node reaches every other node's underlay address,
			// across the router when segments differ.
			for _, a := range lab.Nodes {
				for _, b := range lab.Nodes {
					for _, ip := range []netip.Addr{b.IP, b.IPv6} {
						if ip.IsValid() {
							assert.NoError(t, a.Ping(ctxTimeout(t, 10*time.Second), ip))
						}
					}
				}
			}
		})
	}
}

// checkNode checks a node's kernel state: underlay MTU, forwarding, and
// default routes via the router of its segment.
func checkNode(t *testing.T, n *netlab.Node, opts netlab.Options) {
	t.Helper()
	link, err := n.Handle.LinkByName(n.Iface)
	require.NoError(t, err)
	wantMTU := opts.MTU
	if wantMTU == 0 {
		wantMTU = 1500
	}
	assert.Equal(t, wantMTU, link.Attrs().MTU)
	for _, f := range []struct {
		family int
		ip     netip.Addr
		gw     netip.Addr
		sysctl string
	}{
		{netlink.FAMILY_V4, n.IP, netlab.RouterIP(n.Segment), "/proc/sys/net/ipv4/ip_forward"},
		{netlink.FAMILY_V6, n.IPv6, netlab.RouterIPv6(n.Segment), "/proc/sys/net/ipv6/conf/all/forwarding"},
	} {
		if !f.ip.IsValid() {
			continue
		}
		routes, err := nlsafe.Wrap(n.Handle).RouteList(link, f.family)
		require.NoError(t, err)
		var gws []netip.Addr
		for _, r := range routes {
			if r.Dst == nil || r.Dst.IP.IsUnspecified() {
				gw, _ := netip.AddrFromSlice(r.Gw)
				gws = append(gws, gw.Unmap())
			}
		}
		assert.Equal(t, []netip.Addr{f.gw}, gws, "default routes of %s", n.Name)
		var v []byte
		require.NoError(t, n.Do(func() error {
			var err error
			v, err = os.ReadFile(f.sysctl)
			return err
		}))
		assert.Equal(t, "1", strings.TrimSpace(string(v)), "%s in %s", f.sysctl, n.Name)
	}
}

func TestPodsSameNode(t *testing.T) {
	t.Parallel()
	lab := netlab.NewT(t, netlab.Options{Nodes: 1})
	n := lab.Nodes[0]
	a, err := n.AddPod("a", podNet0, podNet60)
	require.NoError(t, err)
	b, err := n.AddPod("b", podNet0, podNet60)
	require.NoError(t, err)
	assert.Equal(t, netip.MustParseAddr("10.244.0.2"), a.IP)
	assert.Equal(t, netip.MustParseAddr("10.244.0.3"), b.IP)
	assert.Equal(t, netip.MustParseAddr("fd42:244::2"), a.IPv6)
	assert.Equal(t, netip.MustParseAddr("fd42:244::3"), b.IPv6)
	for _, ip := range []netip.Addr{b.IP, b.IPv6} {
		assert.NoError(t, a.Ping(ctxTimeout(t, 10*time.Second), ip))
		assert.NoError(t, a.TCPCheck(ctxTimeout(t, 10*time.Second), b, ip))
	}
	assert.Equal(t, lab.Name+"-node0-a", a.NSName)
	// Pods reach their own node (through cni0) and the node reaches them.
	assert.NoError(t, a.Ping(ctxTimeout(t, 10*time.Second), n.IP))
	assert.NoError(t, n.Ping(ctxTimeout(t, 10*time.Second), b.IP))
	v4, v6 := n.BridgeIP()
	assert.Equal(t, netip.MustParseAddr("10.244.0.1"), v4)
	assert.Equal(t, netip.MustParseAddr("fd42:244::1"), v6)
	assert.Len(t, n.Pods(), 2)
}

func TestPodMTU(t *testing.T) {
	t.Parallel()
	lab := netlab.NewT(t, netlab.Options{Nodes: 1, MTU: 1400})
	n := lab.Nodes[0]
	def, err := n.AddPod("def", podNet0, netip.Prefix{})
	require.NoError(t, err)
	small, err := n.AddPod("small", podNet0, netip.Prefix{}, netlab.WithMTU(1350))
	require.NoError(t, err)
	for _, tc := range []struct {
		pod  *netlab.Pod
		want int
	}{{def, 1400}, {small, 1350}} {
		eth, err := tc.pod.Handle.LinkByName("eth0")
		require.NoError(t, err)
		assert.Equal(t, tc.want, eth.Attrs().MTU, tc.pod.Name)
		host, err := n.Handle.LinkByName(tc.pod.HostIface)
		require.NoError(t, err)
		assert.Equal(t, tc.want, host.Attrs().MTU, tc.pod.HostIface)
	}
}

func TestAddPodErrors(t *testing.T) {
	t.Parallel()
	lab := netlab.NewT(t, netlab.Options{Nodes: 1})
	n := lab.Nodes[0]
	_, err := n.AddPod("p", netip.Prefix{}, netip.Prefix{})
	assert.Error(t, err, "no subnet")
	_, err = n.AddPod("p", podNet0, netip.Prefix{})
	require.NoError(t, err)
	_, err = n.AddPod("p", podNet0, netip.Prefix{})
	assert.Error(t, err, "duplicate name")
	_, err = n.AddPod("q", podNet1, netip.Prefix{})
	assert.Error(t, err, "other subnet")
	_, err = n.AddPod("q", podNet0, podNet60)
	assert.Error(t, err, "other subnet6")
	// Failed calls consume nothing.
	q, err := n.AddPod("q", podNet0, netip.Prefix{})
	require.NoError(t, err)
	assert.Equal(t, netip.MustParseAddr("10.244.0.3"), q.IP)
	assert.Len(t, lab.Namespaces(), 1+1+1+2)

	// A small subnet runs out: /29 has hosts .1 (bridge) to .6.
	lab2 := netlab.NewT(t, netlab.Options{Nodes: 1})
	small := netip.MustParsePrefix("10.9.0.0/29")
	for i := range 5 {
		_, err := lab2.Nodes[0].AddPod(fmt.Sprint("p", i), small, netip.Prefix{})
		require.NoError(t, err)
	}
	_, err = lab2.Nodes[0].AddPod("full", small, netip.Prefix{})
	assert.ErrorContains(t, err, "full")
}

func TestConcurrentPods(t *testing.T) {
	t.Parallel()
	lab := netlab.NewT(t, netlab.Options{Nodes: 2, IPv4: true, IPv6: true})
	const perNode = 4
	pods := make([][]*netlab.Pod, len(lab.Nodes))
	var wg sync.WaitGroup
	for i, n := range lab.Nodes {
		pods[i] = make([]*netlab.Pod, perNode)
		for j := range perNode {
			wg.Go(func() {
				p, err := n.AddPod(fmt.Sprint("p", j), []netip.Prefix{podNet0, podNet1}[i], []netip.Prefix{podNet60, podNet61}[i])
				assert.NoError(t, err)
				pods[i][j] = p
			})
		}
	}
	wg.Wait()
	require.False(t, t.Failed())
	seen := map[netip.Addr]bool{}
	for i := range pods {
		for _, p := range pods[i] {
			assert.False(t, seen[p.IP] || seen[p.IPv6], "duplicate address %s %s", p.IP, p.IPv6)
			seen[p.IP], seen[p.IPv6] = true, true
		}
	}
	// Concurrent checks from every pod to every other pod on its node.
	for i := range pods {
		for _, a := range pods[i] {
			for _, b := range pods[i] {
				if a == b {
					continue
				}
				wg.Go(func() {
					assert.NoError(t, a.Ping(ctxTimeout(t, 10*time.Second), b.IPv6))
					assert.NoError(t, a.TCPCheck(ctxTimeout(t, 10*time.Second), b, b.IP))
				})
			}
		}
	}
	wg.Wait()
}

func TestParallelLabs(t *testing.T) {
	t.Parallel()
	testenv.RequireRoot(t)
	labs := make([]*netlab.Lab, 2)
	var wg sync.WaitGroup
	for i := range labs {
		wg.Go(func() {
			l, err := netlab.New(netlab.Options{Nodes: 2})
			assert.NoError(t, err)
			labs[i] = l
		})
	}
	wg.Wait()
	for _, l := range labs {
		if l != nil {
			t.Cleanup(func() { assert.NoError(t, l.Close()) })
		}
	}
	require.False(t, t.Failed())
	assert.NotEqual(t, labs[0].Name, labs[1].Name)
	// Same addresses, separate worlds: each lab's pods work on their own.
	for _, l := range labs {
		a, err := l.Nodes[0].AddPod("a", podNet0, netip.Prefix{})
		require.NoError(t, err)
		b, err := l.Nodes[0].AddPod("b", podNet0, netip.Prefix{})
		require.NoError(t, err)
		wg.Go(func() {
			assert.NoError(t, l.Nodes[0].Ping(ctxTimeout(t, 10*time.Second), l.Nodes[1].IP))
			assert.NoError(t, a.TCPCheck(ctxTimeout(t, 10*time.Second), b, b.IP))
		})
	}
	wg.Wait()
}

func TestWrongFamily(t *testing.T) {
	t.Parallel()
	lab := netlab.NewT(t, netlab.Options{Nodes: 2})
	a, err := lab.Nodes[0].AddPod("a", podNet0, netip.Prefix{})
	require.NoError(t, err)
	assert.ErrorContains(t, a.Ping(t.Context(), netip.MustParseAddr("fd00::1")), "no address")
	assert.ErrorContains(t, a.TCPCheck(t.Context(), a, netip.MustParseAddr("fd00::1")), "no address")
	assert.ErrorContains(t, lab.Nodes[0].Ping(t.Context(), lab.Nodes[1].IPv6), "invalid")
}

func TestPodsDifferentNodesIsolated(t *testing.T) {
	t.Parallel()
	// Without routes for the pod subnets (a backend's job) pods on
	// different nodes cannot reach each other; the checks give up with ctx.
	lab := netlab.NewT(t, netlab.Options{Nodes: 2, IPv4: true, IPv6: true})
	a, err := lab.Nodes[0].AddPod("a", podNet0, podNet60)
	require.NoError(t, err)
	b, err := lab.Nodes[1].AddPod("b", podNet1, podNet61)
	require.NoError(t, err)
	var wg sync.WaitGroup
	for _, ip := range []netip.Addr{b.IP, b.IPv6} {
		wg.Go(func() {
			err := a.Ping(ctxTimeout(t, 600*time.Millisecond), ip)
			assert.ErrorIs(t, err, context.DeadlineExceeded)
			assert.ErrorContains(t, err, ip.String())
			t.Log(err)
		})
		wg.Go(func() {
			err := a.TCPCheck(ctxTimeout(t, 600*time.Millisecond), b, ip)
			assert.ErrorIs(t, err, context.DeadlineExceeded)
			assert.ErrorContains(t, err, ip.String())
			t.Log(err)
		})
	}
	wg.Wait()
}

func TestCloseRemovesEverything(t *testing.T) {
	t.Parallel()
	testenv.RequireRoot(t)
	lab, err := netlab.New(netlab.Options{Nodes: 2, Segments: 2, IPv6: true, IPv4: true})
	require.NoError(t, err)
	_, err = lab.Nodes[0].AddPod("p", podNet0, podNet60)
	require.NoError(t, err)
	names := lab.Namespaces()
	require.Len(t, names, 1+2+2+1)
	require.NoError(t, lab.Close())
	require.NoError(t, lab.Close())
	for _, name := range names {
		_, err := os.Stat(filepath.Join("/run/netns", name))
		assert.ErrorIs(t, err, os.ErrNotExist, name)
	}
	left, err := filepath.Glob(filepath.Join("/run/netns", lab.Name+"-*"))
	require.NoError(t, err)
	assert.Empty(t, left)
	assert.Empty(t, lab.Namespaces())
	// After Close nothing touches the kernel any more (a closed netlink
	// handle would act in the test's own namespace).
	_, err = lab.Nodes[1].AddPod("late", podNet1, netip.Prefix{})
	assert.ErrorIs(t, err, netlab.ErrClosed)
	assert.ErrorIs(t, lab.Nodes[0].Do(func() error { return nil }), netlab.ErrClosed)
	assert.ErrorIs(t, lab.Nodes[0].Ping(t.Context(), lab.Nodes[1].IP), netlab.ErrClosed)
}

func TestPodsDifferentNodesWithRoutes(t *testing.T) {
	t.Parallel()
	// What host-gw programs: each node routes the other's pod subnets via
	// the other's underlay address. The topology must forward the rest.
	lab := netlab.NewT(t, netlab.Options{Nodes: 2, IPv4: true, IPv6: true})
	n0, n1 := lab.Nodes[0], lab.Nodes[1]
	a, err := n0.AddPod("a", podNet0, podNet60)
	require.NoError(t, err)
	b, err := n1.AddPod("b", podNet1, podNet61)
	require.NoError(t, err)
	for _, r := range []struct {
		on  *netlab.Node
		dst netip.Prefix
		via netip.Addr
	}{
		{n0, podNet1, n1.IP}, {n0, podNet61, n1.IPv6},
		{n1, podNet0, n0.IP}, {n1, podNet60, n0.IPv6},
	} {
		link, err := r.on.Handle.LinkByName(r.on.Iface)
		require.NoError(t, err)
		require.NoError(t, r.on.Handle.RouteAdd(&netlink.Route{
			LinkIndex: link.Attrs().Index,
			Dst:       &net.IPNet{IP: r.dst.Addr().AsSlice(), Mask: net.CIDRMask(r.dst.Bits(), r.dst.Addr().BitLen())},
			Gw:        r.via.AsSlice(),
		}))
	}
	for _, pair := range [][2]*netlab.Pod{{a, b}, {b, a}} {
		from, to := pair[0], pair[1]
		for _, ip := range []netip.Addr{to.IP, to.IPv6} {
			assert.NoError(t, from.Ping(ctxTimeout(t, 10*time.Second), ip))
			assert.NoError(t, from.TCPCheck(ctxTimeout(t, 10*time.Second), to, ip))
		}
	}
}

func TestAddPodFailureLeavesNothing(t *testing.T) {
	t.Parallel()
	lab := netlab.NewT(t, netlab.Options{Nodes: 1})
	n := lab.Nodes[0]
	// Take the name AddPod will use for the pod's host-side veth.
	require.NoError(t, n.Handle.LinkAdd(&netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: "veth1"}}))
	before := lab.Namespaces()
	_, err := n.AddPod("p", podNet0, netip.Prefix{})
	require.Error(t, err)
	t.Log(err)
	assert.Equal(t, before, lab.Namespaces())
	_, err = os.Stat(filepath.Join("/run/netns", lab.Name+"-node0-p"))
	assert.ErrorIs(t, err, os.ErrNotExist)
	// The same pod can be added again and gets the first pod address.
	p, err := n.AddPod("p", podNet0, netip.Prefix{})
	require.NoError(t, err)
	assert.Equal(t, netip.MustParseAddr("10.244.0.2"), p.IP)
	assert.NoError(t, p.Ping(ctxTimeout(t, 10*time.Second), n.IP))
}

func TestSweep(t *testing.T) {
	t.Parallel()
	live := netlab.NewT(t, netlab.Options{Nodes: 1})
	// An orphan: a Lab whose namespaces nobody holds any more, as after a
	// test binary was killed. Close's fds only, keeping the names.
	orphan, err := netlab.New(netlab.Options{Nodes: 1})
	require.NoError(t, err)
	names := orphan.Namespaces()
	require.NotEmpty(t, names)
	netlab.Forget(orphan)

	removed, err := netlab.Sweep()
	require.NoError(t, err)
	// Test binaries of other packages sweep too (go test runs packages in
	// parallel): the orphan may be gone before this Sweep, or be half-way
	// through another process's Sweep, which this one then leaves to it.
	// Check that it ends up gone, not who removed it.
	require.Eventually(t, func() bool {
		for _, name := range names {
			if _, err := os.Stat(filepath.Join("/run/netns", name)); !errors.Is(err, os.ErrNotExist) {
				more, err := netlab.Sweep()
				require.NoError(t, err)
				removed = append(removed, more...)
				return false
			}
		}
		return true
	}, 20*time.Second, 50*time.Millisecond, "orphan namespaces removed")
	for _, name := range live.Namespaces() {
		assert.NotContains(t, removed, name)
		_, err := os.Stat(filepath.Join("/run/netns", name))
		assert.NoError(t, err)
	}
}
