package e2e

import (
	"context"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/net/icmp"
	"golang.org/x/net/ipv4"
	"golang.org/x/net/ipv6"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/memstore"
	"github.com/flannelkit/flannel/vxlan"
)

// newVXLANCluster is newCluster with the vxlan backend in the network
// config; start nodes with startVXLAN.
func newVXLANCluster(t *testing.T, f family, nodes int) *cluster {
	t.Helper()
	cfg, err := lease.ParseConfig(netConf(f, vxlan.Type))
	require.NoError(t, err)
	lab := netlab.NewT(t, netlab.Options{Nodes: nodes, IPv4: f.ipv4, IPv6: f.ipv6})
	c := &cluster{lab: lab, store: memstore.New(cfg, memstore.Options{}), cfg: cfg, fam: f, dir: t.TempDir(), logs: newLogSink(t)}
	for _, ln := range lab.Nodes {
		c.nodes = append(c.nodes, &node{lab: ln})
	}
	t.Cleanup(func() {
		if t.Failed() {
			c.logs.dump()
		}
		for _, n := range c.nodes {
			if n.cancel != nil {
				n.cancel()
				<-n.done
			}
		}
	})
	return c
}

// startVXLAN runs node i's agent with a new vxlan backend (as a restarted
// process would have) and waits until it is ready.
func (c *cluster) startVXLAN(t *testing.T, i int) {
	t.Helper()
	n := c.nodes[i]
	iface, err := backend.FindInterface(n.lab.Handle, backend.InterfaceOptions{IPv4: c.fam.ipv4, IPv6: c.fam.ipv6})
	require.NoError(t, err)
	be, err := vxlan.New(vxlan.Options{RepairInterval: time.Second})
	require.NoError(t, err)
	n.agent, err = flannel.NewAgent(flannel.AgentOptions{
		Store:      c.store,
		Backend:    be,
		Iface:      iface,
		Handle:     n.lab.Handle,
		NS:         n.lab.NS,
		Logger:     c.logs.logger().With("node", n.lab.Name),
		SubnetFile: c.subnetFile(i),
	})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(context.Background())
	n.cancel = cancel
	n.done = make(chan error, 1)
	go func() { n.done <- n.agent.Run(ctx) }()
	select {
	case <-n.agent.Ready():
	case err := <-n.done:
		t.Fatalf("agent %s returned before ready: %v", n.lab.Name, err)
	case <-time.After(60 * time.Second):
		t.Fatalf("agent %s not ready", n.lab.Name)
	}
}

func (c *cluster) startAllVXLAN(t *testing.T) {
	for i := range c.nodes {
		c.startVXLAN(t, i)
	}
	c.waitPeers(t, len(c.nodes)-1)
}

// vxlanPods adds one pod per node with the agent's MTU.
func (c *cluster) vxlanPods(t *testing.T) []*netlab.Pod {
	t.Helper()
	var pods []*netlab.Pod
	for _, n := range c.nodes {
		st := n.agent.State()
		p, err := n.lab.AddPod("p0", st.Lease.Subnet, st.Lease.IPv6Subnet, netlab.WithMTU(st.MTU))
		require.NoError(t, err)
		pods = append(pods, p)
	}
	return pods
}

// vxlanTX sums the TX packet counters of node n's flannel devices.
func vxlanTX(t *testing.T, n *netlab.Node) uint64 {
	t.Helper()
	var sum uint64
	for _, name := range []string{"flannel.1", "flannel-v6.1"} {
		if l, err := n.Handle.LinkByName(name); err == nil {
			sum += l.Attrs().Statistics.TxPackets
		}
	}
	return sum
}

func TestVXLANThreeNodes(t *testing.T) {
	for _, f := range families {
		t.Run(f.name, func(t *testing.T) {
			c := newVXLANCluster(t, f, 3)
			c.startAllVXLAN(t)
			pods := c.vxlanPods(t)
			var before []uint64
			for _, n := range c.nodes {
				st := n.agent.State()
				assert.Equal(t, vxlan.Type, st.Lease.Attrs.BackendType)
				if f.ipv4 {
					assert.Contains(t, string(st.Lease.Attrs.BackendData), `"VtepMAC"`)
				}
				if f.ipv6 {
					assert.Contains(t, string(st.Lease.Attrs.BackendV6Data), `"VtepMAC"`)
				}
				before = append(before, vxlanTX(t, n.lab))
			}
			checkAllPairs(t, pods)
			for i, n := range c.nodes {
				assert.Greater(t, vxlanTX(t, n.lab), before[i], "node %s sent through its vxlan device", n.lab.Name)
			}
		})
	}
}

// vxlanEntries renders node n's permanent neighbour and FDB entries and
// our routes (the whole vxlan datapath), for before/after comparisons.
func vxlanEntries(t *testing.T, n *netlab.Node) []string {
	t.Helper()
	out := ourRoutes(t, n)
	for _, name := range []string{"flannel.1", "flannel-v6.1"} {
		l, err := n.Handle.LinkByName(name)
		if err != nil {
			continue
		}
		for _, fam := range []int{unix.AF_BRIDGE, unix.AF_INET, unix.AF_INET6} {
			ns, err := nlsafe.Wrap(n.Handle).NeighList(l.Attrs().Index, fam)
			require.NoError(t, err)
			for _, e := range ns {
				if e.State&netlink.NUD_PERMANENT != 0 {
					out = append(out, name+" "+e.IP.String()+" "+e.HardwareAddr.String())
				}
			}
		}
		out = append(out, name+" mac "+l.Attrs().HardwareAddr.String())
	}
	return out
}

// TestVXLANRestartWithoutLoss: node 0's pod pings node 1's pod at 200
// packets/s (both families) while node 0's agent is stopped and started
// again with a new backend: no packet is lost, the VTEP MACs, the lease
// and every kernel entry stay as they were.
func TestVXLANRestartWithoutLoss(t *testing.T) {
	c := newVXLANCluster(t, families[2], 3)
	c.startAllVXLAN(t)
	pods := c.vxlanPods(t)
	checkAllPairs(t, pods)
	n0 := c.nodes[0]
	before := n0.agent.State().Lease
	entries := vxlanEntries(t, n0.lab)

	ctx, stopPing := context.WithCancel(context.Background())
	type result struct {
		sent, got int
		err       error
	}
	results := make([]result, 2)
	var wg sync.WaitGroup
	for i, dst := range []netip.Addr{pods[1].IP, pods[1].IPv6} {
		wg.Go(func() {
			s, g, err := pingFlood(ctx, pods[0], dst, 5*time.Millisecond)
			results[i] = result{s, g, err}
		})
	}
	time.Sleep(300 * time.Millisecond) // some packets before the stop
	n0.stop(t)
	c.startVXLAN(t, 0)
	c.waitPeers(t, 2)
	time.Sleep(300 * time.Millisecond) // and some after the start
	stopPing()
	wg.Wait()
	for i, r := range results {
		require.NoError(t, r.err, "pinger %d", i)
		assert.Greater(t, r.sent, 50, "pinger %d sent", i)
		assert.Equal(t, r.sent, r.got, "pinger %d: every echo answered", i)
	}
	after := n0.agent.State().Lease
	assert.True(t, before.SameSubnets(after))
	assert.JSONEq(t, string(before.Attrs.BackendData), string(after.Attrs.BackendData), "VTEP MAC kept")
	assert.JSONEq(t, string(before.Attrs.BackendV6Data), string(after.Attrs.BackendV6Data), "VTEP MAC kept")
	assert.ElementsMatch(t, entries, vxlanEntries(t, n0.lab), "datapath unchanged")
}

// pingFlood sends ICMP echo requests from pod to dst every interval until
// ctx ends, then waits up to a second for the last replies. It returns how
// many were sent and how many distinct ones were answered.
func pingFlood(ctx context.Context, pod *netlab.Pod, dst netip.Addr, interval time.Duration) (sent, got int, err error) {
	network, src := "ip4:icmp", pod.IP
	var req, reply icmp.Type = ipv4.ICMPTypeEcho, ipv4.ICMPTypeEchoReply
	proto := 1
	if dst.Is6() {
		network, src, req, reply, proto = "ip6:ipv6-icmp", pod.IPv6, ipv6.ICMPTypeEchoRequest, ipv6.ICMPTypeEchoReply, 58
	}
	var conn *icmp.PacketConn
	if err := nlsafe.InNamespace(pod.NS, func() error {
		var err error
		conn, err = icmp.ListenPacket(network, src.String())
		return err
	}); err != nil {
		return 0, 0, err
	}
	defer conn.Close()
	id := int(time.Now().UnixNano() & 0xffff)
	answered := map[int]bool{}
	var mu sync.Mutex
	recvDone := make(chan struct{})
	go func() {
		defer close(recvDone)
		buf := make([]byte, 1500)
		for {
			n, _, err := conn.ReadFrom(buf)
			if err != nil {
				return // deadline or closed
			}
			m, err := icmp.ParseMessage(proto, buf[:n])
			if err != nil || m.Type != reply {
				continue
			}
			if e, ok := m.Body.(*icmp.Echo); ok && e.ID == id {
				mu.Lock()
				answered[e.Seq] = true
				mu.Unlock()
			}
		}
	}()
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	to := &net.IPAddr{IP: ipconv.IPFromAddr(dst)}
loop:
	for {
		select {
		case <-ctx.Done():
			break loop
		case <-ticker.C:
		}
		b, err := (&icmp.Message{Type: req, Body: &icmp.Echo{ID: id, Seq: sent & 0xffff, Data: []byte("flannel")}}).Marshal(nil)
		if err != nil {
			return sent, 0, err
		}
		if _, err := conn.WriteTo(b, to); err != nil {
			return sent, 0, err
		}
		sent++
	}
	// Late replies: wait until all are in or a second passed.
	deadline := time.Now().Add(time.Second)
	for time.Now().Before(deadline) {
		mu.Lock()
		n := len(answered)
		mu.Unlock()
		if n >= sent {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	conn.SetReadDeadline(time.Now())
	<-recvDone
	mu.Lock()
	defer mu.Unlock()
	return sent, len(answered), nil
}
