package vxlan

import (
	"fmt"
	"net"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

func TestDiffNeigh(t *testing.T) {
	macA, _ := net.ParseMAC("0a:00:00:00:00:0a")
	macB, _ := net.ParseMAC("0a:00:00:00:00:0b")
	ip1, ip2 := netip.MustParseAddr("10.244.1.0"), netip.MustParseAddr("10.244.2.0")
	perm := func(ip netip.Addr, mac net.HardwareAddr) netlink.Neigh {
		return netlink.Neigh{LinkIndex: 5, IP: ipconv.IPFromAddr(ip), HardwareAddr: mac, State: netlink.NUD_PERMANENT}
	}
	want := func(ip netip.Addr, mac net.HardwareAddr) op { return op{link: 5, ip: ip, mac: mac} }
	render := func(ops []op) []string {
		var out []string
		for _, o := range ops {
			out = append(out, fmt.Sprintf("%s %s", o.ip, o.mac))
		}
		return out
	}
	tests := []struct {
		name           string
		kind           kind
		want           []op
		actual         []netlink.Neigh
		wantSet, wantD []string
	}{
		{name: "empty", kind: kindNeigh},
		{name: "add missing", kind: kindNeigh, want: []op{want(ip1, macA)}, wantSet: []string{"10.244.1.0 0a:00:00:00:00:0a"}},
		{name: "in place", kind: kindNeigh, want: []op{want(ip1, macA)}, actual: []netlink.Neigh{perm(ip1, macA)}},
		{name: "wrong mac replaced", kind: kindNeigh, want: []op{want(ip1, macB)}, actual: []netlink.Neigh{perm(ip1, macA)},
			wantSet: []string{"10.244.1.0 0a:00:00:00:00:0b"}},
		{name: "stale deleted", kind: kindNeigh, actual: []netlink.Neigh{perm(ip2, macA)}, wantD: []string{"10.244.2.0 0a:00:00:00:00:0a"}},
		{name: "learned entries left alone", kind: kindNeigh,
			actual: []netlink.Neigh{{LinkIndex: 5, IP: ipconv.IPFromAddr(ip2), HardwareAddr: macA, State: netlink.NUD_REACHABLE}}},
		{name: "fdb keyed by mac and dst", kind: kindFDB, want: []op{want(ip1, macB)}, actual: []netlink.Neigh{perm(ip1, macA)},
			wantSet: []string{"10.244.1.0 0a:00:00:00:00:0b"}, wantD: []string{"10.244.1.0 0a:00:00:00:00:0a"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			set, del := diffNeigh(tc.kind, tc.want, tc.actual)
			assert.Equal(t, tc.wantSet, render(set))
			assert.Equal(t, tc.wantD, render(del))
			for _, d := range del {
				assert.True(t, d.del)
				assert.Equal(t, -1, d.peer)
				assert.Equal(t, tc.kind, d.kind)
			}
		})
	}
}

// TestWriterMapsErrors: a batch with failing requests in the middle
// reports each error at its own op, and the others are programmed.
func TestWriterMapsErrors(t *testing.T) {
	t.Parallel()
	c := newCluster(t, netlab.Options{Nodes: 1}, Options{})
	n := c.Nodes[0]
	dev := nw(n).dev(false).index
	var ops []op
	for k := range 3000 {
		mac := net.HardwareAddr{0x0a, 0, 0, 0, byte(k >> 8), byte(k)}
		ip := netip.AddrFrom4([4]byte{10, 200, byte(k >> 8), byte(k)})
		link := dev
		if k%1000 == 500 {
			link = 99999 // no such device
		}
		ops = append(ops, op{kind: kindNeigh, link: link, ip: ip, mac: mac, peer: k})
	}
	w, err := newWriter(n.Node.NS)
	require.NoError(t, err)
	defer w.Close()
	errs := w.write(ops)
	require.Len(t, errs, len(ops))
	for k, e := range errs {
		if k%1000 == 500 {
			assert.ErrorIs(t, e, unix.ENODEV, "op %d", k)
		} else {
			assert.NoError(t, e, "op %d", k)
		}
	}
	got, err := nlsafe.Wrap(n.Node.Handle).NeighList(dev, unix.AF_INET)
	require.NoError(t, err)
	perm := 0
	for _, e := range got {
		if e.State&netlink.NUD_PERMANENT != 0 {
			perm++
		}
	}
	assert.Equal(t, 2997, perm)
	// Deleting succeeds, and deleting again (already gone) too.
	for i := range ops {
		ops[i].del = true
	}
	for round := range 2 {
		for k, e := range w.write(ops) {
			if k%1000 != 500 {
				assert.NoError(t, e, "delete %d, round %d", k, round)
			}
		}
	}
}
