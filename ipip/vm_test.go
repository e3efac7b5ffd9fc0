package ipip_test

import (
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/internal/vmlab"
	"github.com/flannelkit/flannel/ipip"
	"github.com/flannelkit/flannel/lease"
)

// vmModules are loaded at boot in the VM (ipip brings tunnel4 and
// ip_tunnel; netlink handles open XFRM and netfilter sockets too, hence
// xfrm_user and nfnetlink).
var vmModules = []string{"ipip", "veth", "bridge", "xfrm_user", "nfnetlink"}

// TestVM runs the TestInVM* tests of this package inside a qemu VM whose
// kernel has ipip (the host's has not): one boot for all of them.
func TestVM(t *testing.T) {
	res := vmlab.RunVM(t, vmlab.Boot{Run: "^TestInVM", Modules: vmModules, Timeout: 10 * time.Minute})
	require.Contains(t, res.Output, "--- PASS: TestInVMReachability")
	require.Contains(t, res.Output, "--- PASS: TestInVMContract")
	require.NotContains(t, res.Output, "--- SKIP", "a test skipped inside the VM")
}

var (
	inVM = vmlab.InVM
	ctxT = vmlab.Ctx
)

type vnode struct {
	node  *netlab.Node
	env   flannel.Env
	b     *ipip.Backend
	net   flannel.Network
	lease lease.Lease
	pod   *netlab.Pod
	logs  *testenv.LogBuffer
}

type vcluster struct {
	t     *testing.T
	lab   *netlab.Lab
	cfg   lease.Config
	opts  ipip.Options
	nodes []*vnode
}

// newCluster builds n nodes on two L2 segments behind the lab's router
// (node i on segment i%2), each with the backend started and a pod.
func newCluster(t *testing.T, n int, opts ipip.Options) *vcluster {
	t.Helper()
	lab := netlab.NewT(t, netlab.Options{Nodes: n, Segments: 2})
	cfg, err := lease.ParseConfig([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"ipip"}}`))
	require.NoError(t, err)
	c := &vcluster{t: t, lab: lab, cfg: cfg, opts: opts}
	for i, nd := range lab.Nodes {
		v := &vnode{node: nd, logs: &testenv.LogBuffer{}}
		v.env = vmlab.NodeEnv(nd, cfg, slog.New(slog.NewTextHandler(v.logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
		c.nodes = append(c.nodes, v)
		c.start(i)
		v.pod, err = nd.AddPod("pod", v.lease.Subnet, netip.Prefix{}, netlab.WithMTU(v.net.MTU()))
		require.NoError(t, err)
	}
	return c
}

// start prepares and starts node i's backend, as an agent start does.
func (c *vcluster) start(i int) {
	t := c.t
	v := c.nodes[i]
	v.b = ipip.New(c.opts)
	attrs, err := v.b.Prepare(t.Context(), v.env)
	require.NoError(t, err)
	v.lease = lease.Lease{Subnet: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i + 1), 0}), 24), Attrs: attrs}
	v.net, err = v.b.Start(t.Context(), v.lease)
	require.NoError(t, err)
}

func (c *vcluster) leases() []lease.Lease {
	var ls []lease.Lease
	for _, v := range c.nodes {
		ls = append(ls, v.lease)
	}
	return ls
}

func (c *vcluster) applyAll() {
	for i, v := range c.nodes {
		require.NoError(c.t, v.net.Apply(c.t.Context(), c.leases()), "node %d apply", i)
	}
}

func (c *vcluster) checkPair(a, b *vnode) {
	t := c.t
	t.Helper()
	require.NoError(t, a.pod.Ping(ctxT(t, 30*time.Second), b.pod.IP), "ping %s -> %s", a.node.Name, b.node.Name)
	require.NoError(t, a.pod.TCPCheck(ctxT(t, 30*time.Second), b.pod, b.pod.IP), "tcp %s -> %s", a.node.Name, b.node.Name)
}

func (c *vcluster) checkAllPairs() {
	var pods []*netlab.Pod
	for _, v := range c.nodes {
		pods = append(pods, v.pod)
	}
	vmlab.CheckPairs(c.t, pods, 30*time.Second)
}

// ours renders node v's routes of ours as "dst via gw dev <name> [onlink]".
func ours(t *testing.T, v *vnode) []string {
	t.Helper()
	return oursOn(t, v.node.Handle)
}

// oursOn renders the routes of ours that h sees, as ours does.
func oursOn(t *testing.T, h *netlink.Handle) []string {
	t.Helper()
	rec := backend.RouteReconciler{}
	rs, err := rec.Owned(h, 0)
	require.NoError(t, err)
	var out []string
	for _, r := range rs {
		l, err := h.LinkByIndex(r.LinkIndex)
		require.NoError(t, err)
		s := fmt.Sprintf("%s via %s dev %s", r.Dst, r.Gw, l.Attrs().Name)
		if r.Flags&unix.RTNH_F_ONLINK != 0 {
			s += " onlink"
		}
		out = append(out, s)
	}
	slices.Sort(out)
	return out
}

// wantOurs is what node v should hold: direct routes to peers on its
// segment when direct is set, tunnel routes to the others.
func (c *vcluster) wantOurs(v *vnode, direct bool) []string {
	var out []string
	for _, p := range c.nodes {
		if p == v {
			continue
		}
		if direct && p.node.Segment == v.node.Segment {
			out = append(out, fmt.Sprintf("%s via %s dev eth0", p.lease.Subnet, p.node.IP))
		} else {
			out = append(out, fmt.Sprintf("%s via %s dev %s onlink", p.lease.Subnet, p.node.IP, ipip.DeviceName))
		}
	}
	slices.Sort(out)
	return out
}

// counter counts IPv4 frames by IP protocol on segment 0's bridge ports
// whose source and destination are both among the given addresses (the two
// nodes and their pods), i.e. on the wire between node0 and node2. Frames of other pairs that cross segment 0 (node0 to
// node1 through the router, and the last TCP segments of an earlier
// check still closing) are not counted.
type counter struct {
	ipip, icmp atomic.Int64
	stop       func()
}

func countFrames(t *testing.T, lab *netlab.Lab, among ...netip.Addr) *counter {
	t.Helper()
	c := &counter{}
	c.stop = vmlab.Tap(t, lab, func(f []byte) {
		if len(f) < 14+20 || f[12] != 0x08 || f[13] != 0x00 {
			return
		}
		src, _ := netip.AddrFromSlice(f[14+12 : 14+16])
		dst, _ := netip.AddrFromSlice(f[14+16 : 14+20])
		if !slices.Contains(among, src) || !slices.Contains(among, dst) {
			return
		}
		switch f[14+9] {
		case unix.IPPROTO_IPIP:
			c.ipip.Add(1)
		case unix.IPPROTO_ICMP:
			c.icmp.Add(1)
		}
	})
	return c
}
