package vxlan

import (
	"fmt"
	"net/netip"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/backendtest"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

// newCluster builds a vxlan backendtest.Cluster: a lab whose every node
// has a started Network and one pod with the Network's MTU. No peer is
// applied yet.
func newCluster(t *testing.T, opts netlab.Options, bopts Options) *backendtest.Cluster {
	t.Helper()
	return backendtest.NewCluster(t, backendtest.ClusterOptions{Lab: opts, Type: Type, New: func(t *testing.T, _ int) flannel.Backend {
		b, err := New(bopts)
		require.NoError(t, err)
		return b
	}})
}

// nw is n's Network and bk its Backend.
func nw(n *backendtest.Node) *Network { return n.Net.(*Network) }
func bk(n *backendtest.Node) *Backend { return n.Backend.(*Backend) }

// state renders the kernel entries of n's flannel devices and our routes
// on the external interface, sorted, e.g.
// "fdb flannel.1 aa:.. dst 172.30.0.11", "neigh flannel.1 10.244.1.0 aa:..",
// "route flannel.1 10.244.1.0/24 via 10.244.1.0 onlink",
// "route eth0 10.244.1.0/24 via 172.30.0.11".
func state(t *testing.T, n *backendtest.Node) []string {
	t.Helper()
	h := n.Node.Handle
	var out []string
	links := map[int]string{n.Env.Iface.Index: n.Env.Iface.Name}
	for _, d := range nw(n).devs {
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
		fdb, err := nlsafe.Wrap(h).NeighList(idx, unix.AF_BRIDGE)
		require.NoError(t, err)
		for _, e := range fdb {
			if e.State&netlink.NUD_PERMANENT != 0 {
				out = append(out, fmt.Sprintf("fdb %s %s dst %s", d.spec.name, e.HardwareAddr, e.IP))
			}
		}
		ns, err := nlsafe.Wrap(h).NeighList(idx, fam)
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
func want(c *backendtest.Cluster, n *backendtest.Node, direct func(p *backendtest.Node) bool, peers ...*backendtest.Node) []string {
	var out []string
	for _, p := range peers {
		if p == n {
			continue
		}
		for _, v6 := range []bool{false, true} {
			if (v6 && !c.V6) || (!v6 && !c.V4) {
				continue
			}
			subnet, public, dev := p.Lease.Subnet, p.Node.IP, deviceName(bk(n).opts.VNI, false)
			if v6 {
				subnet, public, dev = p.Lease.IPv6Subnet, p.Node.IPv6, deviceName(bk(n).opts.VNI, true)
			}
			if direct != nil && direct(p) {
				out = append(out, fmt.Sprintf("route %s %s via %s", n.Env.Iface.Name, subnet, public))
				continue
			}
			mac := nw(p).VtepMAC(v6)
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
func txPackets(t *testing.T, n *backendtest.Node, v6 bool) uint64 {
	t.Helper()
	l, err := n.Node.Handle.LinkByName(deviceName(bk(n).opts.VNI, v6))
	require.NoError(t, err)
	return l.Attrs().Statistics.TxPackets
}

func mustAddr(s string) netip.Addr { return netip.MustParseAddr(s) }
