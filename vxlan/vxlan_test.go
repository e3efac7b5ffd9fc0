package vxlan

import (
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	flannel "github.com/flannelkit/flannel"

	"github.com/flannelkit/flannel/internal/backendtest"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/netlab"
)

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
			c.ApplyAll(t)
			for _, n := range c.Nodes {
				assert.Equal(t, want(c, n, nil, c.Nodes...), state(t, n), "entries on %s", n.Node.Name)
				if !c.V6 {
					assert.Equal(t, 1450, nw(n).MTU())
				} else {
					assert.Equal(t, 1430, nw(n).MTU())
				}
			}
			before := map[bool]uint64{}
			for _, v6 := range []bool{false, true} {
				if (v6 && c.V6) || (!v6 && c.V4) {
					before[v6] = txPackets(t, c.Nodes[0], v6)
				}
			}
			c.CheckAll(t)
			// The traffic went through the VXLAN devices.
			for v6, b := range before {
				assert.Greater(t, txPackets(t, c.Nodes[0], v6), b+4, "tx packets on the v6=%t device", v6)
			}
		})
	}
}

// TestApplyInChunks: on a kernel with none of its entries yet, a full
// apply programs each table in chunks built from the memos; with chunks of
// one entry every entry still arrives, in both families, and pods talk.
func TestApplyInChunks(t *testing.T) {
	c := newCluster(t, netlab.Options{Nodes: 3, IPv4: true, IPv6: true}, Options{})
	for _, n := range c.Nodes {
		nw(n).chunk = 1
	}
	c.ApplyAll(t)
	for _, n := range c.Nodes {
		assert.Equal(t, want(c, n, nil, c.Nodes...), state(t, n), "entries on %s", n.Node.Name)
	}
	c.CheckAll(t)
}

// TestContract runs the dataplane contract suite. Its damage: a peer's
// neighbour, FDB entry and route deleted, a device set down, both devices
// deleted.
func TestContract(t *testing.T) {
	dev := func(t *testing.T, n *backendtest.Node) netlink.Link {
		l, err := n.Node.Handle.LinkByName(deviceName(1, false))
		require.NoError(t, err)
		return l
	}
	backendtest.Run(t, backendtest.Fixture{
		Type: Type,
		New: func(t *testing.T, repair time.Duration) flannel.Backend {
			b, err := New(Options{RepairInterval: repair})
			require.NoError(t, err)
			return b
		},
		Dump: state,
		Damage: []backendtest.Damage{
			{Name: "neighbour", Do: func(t *testing.T, n, peer *backendtest.Node) {
				require.NoError(t, n.Node.Handle.NeighDel(&netlink.Neigh{LinkIndex: dev(t, n).Attrs().Index, IP: ipconv.IPFromAddr(peer.Lease.Subnet.Addr()), Family: unix.AF_INET}))
			}},
			{Name: "fdb entry", Do: func(t *testing.T, n, peer *backendtest.Node) {
				require.NoError(t, n.Node.Handle.NeighDel(&netlink.Neigh{LinkIndex: dev(t, n).Attrs().Index, Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF,
					HardwareAddr: nw(peer).VtepMAC(false), IP: ipconv.IPFromAddr(peer.Node.IP)}))
			}},
			{Name: "route", Do: func(t *testing.T, n, peer *backendtest.Node) {
				require.NoError(t, n.Node.Handle.RouteDel(&netlink.Route{LinkIndex: dev(t, n).Attrs().Index, Dst: ipconv.IPNetFromPrefix(peer.Lease.Subnet)}))
			}},
			{Name: "device down", Do: func(t *testing.T, n, _ *backendtest.Node) {
				require.NoError(t, n.Node.Handle.LinkSetDown(dev(t, n)))
			}},
			{Name: "devices deleted", Do: func(t *testing.T, n, _ *backendtest.Node) {
				for _, v6 := range []bool{false, true} {
					l, err := n.Node.Handle.LinkByName(deviceName(1, v6))
					require.NoError(t, err)
					require.NoError(t, n.Node.Handle.LinkDel(l))
				}
			}},
		},
	})
}
