package vxlan

import (
	"context"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/backendtest"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/lease"
)

// table is one kernel table check and the diff compare.
type table struct {
	name string
	k    kind
	link int
	v6   bool
}

// tables lists n's tables: per device its FDB and neighbours, and the
// routes of every link.
func tables(n *Network) []table {
	out := []table{{"routes " + n.env.Iface.Name, kindRoute, n.env.Iface.Index, false}}
	for _, d := range n.devs {
		out = append(out,
			table{"fdb " + d.spec.name, kindFDB, d.index, d.spec.v6},
			table{"neigh " + d.spec.name, kindNeigh, d.index, d.spec.v6},
			table{"routes " + d.spec.name, kindRoute, d.index, d.spec.v6})
	}
	return out
}

// checks is what check reports for each of n's tables, and whether the
// diff finds anything to change in each.
func checks(t *testing.T, n *Network) (got map[string]tableState, diffs map[string]bool) {
	t.Helper()
	got, diffs = map[string]tableState{}, map[string]bool{}
	n.r.Locked(func() {
		for _, tb := range tables(n) {
			got[tb.name] = n.check(n.memo, tb.k, tb.link, tb.v6)
			build := func() []op { return n.memo.table(tb.k, tb.link) }
			if tb.k == kindRoute {
				s, d, none, err := n.diffRoutes(tb.link, build)
				require.NoError(t, err)
				diffs[tb.name] = len(s)+len(d) > 0 || (none && len(build()) > 0)
				continue
			}
			family := unix.AF_BRIDGE
			if tb.k == kindNeigh {
				family = unix.AF_INET
				if tb.v6 {
					family = unix.AF_INET6
				}
			}
			diff := newLazyNeighDiff(tb.k, build)
			require.NoError(t, nlsafe.New(n.env.Handle, n.env.NS).NeighListEach(tb.link, family, diff.reset, diff.see))
			s, d := diff.result()
			diffs[tb.name] = len(s)+len(d) > 0
		}
	})
	return got, diffs
}

// TestCheckTables: check vouches for a table exactly when the diff would
// change nothing in it. Each change someone else makes to one table
// (a lost, changed or extra entry of ours) is seen in that table only;
// entries the diff leaves alone (not permanent, another protocol's route)
// are left alone by check too.
func TestCheckTables(t *testing.T) {
	t.Parallel()
	c := newCluster(t, netlab.Options{Nodes: 4, IPv4: true, IPv6: true, Segments: 2}, Options{DirectRouting: true})
	n0 := c.Nodes[0]
	n := nw(n0)
	h := n0.Node.Handle

	got, _ := checks(t, n)
	for _, tb := range tables(n) {
		assert.Equal(t, tableEmpty, got[tb.name], "%s before the first Apply", tb.name)
	}
	c.ApplyAll(t)
	inPlace := func(what string) {
		t.Helper()
		got, diffs := checks(t, n)
		for _, tb := range tables(n) {
			assert.Equal(t, tableInPlace, got[tb.name], "%s: %s", what, tb.name)
			assert.False(t, diffs[tb.name], "%s: the diff of %s", what, tb.name)
		}
	}
	inPlace("applied")

	// A peer across the segments (overlay) and one beside n0 (direct).
	var far, near *backendtest.Node
	for _, p := range c.Nodes[1:] {
		if p.Node.Segment == n0.Node.Segment {
			near = p
		} else {
			far = p
		}
	}
	require.NotNil(t, far)
	require.NotNil(t, near)
	dev := func(v6 bool) int { return n.dev(v6).index }
	mac := func(v6 bool) net.HardwareAddr { return nw(far).VtepMAC(v6) }
	other := net.HardwareAddr{0x0a, 0, 0, 0, 0xee, 1}
	ours := n.rec.Normalized(0, netlink.Route{})
	overlay := func(v6 bool) netlink.Route {
		s := far.Lease.Subnet
		if v6 {
			s = far.Lease.IPv6Subnet
		}
		return netlink.Route{LinkIndex: dev(v6), Dst: ipconv.IPNetFromPrefix(s), Gw: ipconv.IPFromAddr(s.Addr()),
			Flags: int(netlink.FLAG_ONLINK), Protocol: ours.Protocol, Table: ours.Table}
	}
	neigh := func(v6 bool, ip string, hw net.HardwareAddr, state int) *netlink.Neigh {
		fam := netlink.FAMILY_V4
		if v6 {
			fam = netlink.FAMILY_V6
		}
		return &netlink.Neigh{LinkIndex: dev(v6), Family: fam, State: state, IP: net.ParseIP(ip), HardwareAddr: hw}
	}
	fdb := func(v6 bool, ip string, hw net.HardwareAddr) *netlink.Neigh {
		return &netlink.Neigh{LinkIndex: dev(v6), Family: unix.AF_BRIDGE, Flags: netlink.NTF_SELF, State: netlink.NUD_PERMANENT,
			IP: net.ParseIP(ip), HardwareAddr: hw}
	}
	farNeigh := func(v6 bool, hw net.HardwareAddr) *netlink.Neigh {
		s := far.Lease.Subnet
		if v6 {
			s = far.Lease.IPv6Subnet
		}
		return neigh(v6, s.Addr().String(), hw, netlink.NUD_PERMANENT)
	}
	farFDB := func(v6 bool) *netlink.Neigh {
		ip := far.Node.IP
		if v6 {
			ip = far.Node.IPv6
		}
		return fdb(v6, ip.String(), mac(v6))
	}
	direct := func(v6 bool) netlink.Route {
		s, gw := near.Lease.Subnet, near.Node.IP
		if v6 {
			s, gw = near.Lease.IPv6Subnet, near.Node.IPv6
		}
		return netlink.Route{LinkIndex: n.env.Iface.Index, Dst: ipconv.IPNetFromPrefix(s), Gw: ipconv.IPFromAddr(gw),
			Protocol: ours.Protocol, Table: ours.Table}
	}
	v4dev, v6dev := n.dev(false).spec.name, n.dev(true).spec.name
	eth := n.env.Iface.Name

	for _, tc := range []struct {
		name    string
		table   string // the one table that differs; "" for none
		change  func() error
		restore func() error // when the next Apply does not undo it
	}{
		{name: "neighbour lost", table: "neigh " + v4dev, change: func() error { return h.NeighDel(farNeigh(false, mac(false))) }},
		{name: "neighbour of another MAC", table: "neigh " + v6dev, change: func() error { return h.NeighSet(farNeigh(true, other)) }},
		{name: "stranger neighbour", table: "neigh " + v4dev, change: func() error {
			return h.NeighAdd(neigh(false, "10.244.250.0", other, netlink.NUD_PERMANENT))
		}},
		{name: "learnt neighbour", change: func() error { return h.NeighAdd(neigh(false, "10.244.251.0", other, netlink.NUD_REACHABLE)) },
			restore: func() error { return h.NeighDel(neigh(false, "10.244.251.0", other, 0)) }},
		{name: "FDB entry lost", table: "fdb " + v6dev, change: func() error { return h.NeighDel(farFDB(true)) }},
		{name: "stranger FDB entry", table: "fdb " + v4dev, change: func() error { return h.NeighAppend(fdb(false, "172.31.9.9", other)) }},
		{name: "overlay route lost", table: "routes " + v4dev, change: func() error { r := overlay(false); return h.RouteDel(&r) }},
		{name: "overlay route via another gateway", table: "routes " + v6dev, change: func() error {
			r := overlay(true)
			r.Gw = net.ParseIP("fd00:10:244:ee::")
			return h.RouteReplace(&r)
		}},
		{name: "overlay route with an MTU", table: "routes " + v4dev, change: func() error {
			r := overlay(false)
			r.MTU = 1300
			return h.RouteReplace(&r)
		}},
		{name: "second overlay route of another metric", table: "routes " + v4dev, change: func() error {
			r := overlay(false)
			r.Priority = 77
			return h.RouteAdd(&r)
		}},
		{name: "direct route lost", table: "routes " + eth, change: func() error { r := direct(true); return h.RouteDel(&r) }},
		{name: "stranger route of ours", table: "routes " + eth, change: func() error {
			r := direct(false)
			r.Dst = ipconv.IPNetFromPrefix(netip.MustParsePrefix("10.244.252.0/24"))
			return h.RouteAdd(&r)
		}},
		{name: "another protocol's route", change: func() error {
			r := overlay(false)
			r.Dst, r.Protocol = ipconv.IPNetFromPrefix(netip.MustParsePrefix("10.244.253.0/24")), unix.RTPROT_STATIC
			return h.RouteAdd(&r)
		}, restore: func() error {
			return h.RouteDel(&netlink.Route{LinkIndex: dev(false), Dst: ipconv.IPNetFromPrefix(netip.MustParsePrefix("10.244.253.0/24"))})
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.NoError(t, tc.change())
			got, diffs := checks(t, n)
			for _, tb := range tables(n) {
				if tb.name == tc.table {
					assert.Equal(t, tableDiffers, got[tb.name], tb.name)
					assert.True(t, diffs[tb.name], "the diff of %s", tb.name)
					continue
				}
				assert.Equal(t, tableInPlace, got[tb.name], tb.name)
				assert.False(t, diffs[tb.name], "the diff of %s", tb.name)
			}
			if tc.restore != nil {
				require.NoError(t, tc.restore())
			}
			n.r.Locked(func() { n.synced = false })
			require.NoError(t, n.Apply(context.Background(), c.Leases()))
			inPlace("repaired")
		})
	}
}

// TestCheckAllocates: vouching for tables in place costs one allocation
// whatever the number of peers, not one per entry: the index of the memos
// is built in the arrays of the last check.
func TestCheckAllocates(t *testing.T) {
	c := newCluster(t, netlab.Options{Nodes: 1}, Options{})
	n0 := c.Nodes[0]
	n := nw(n0)
	peers := []lease.Lease{n0.Lease}
	for k := range 600 {
		peers = append(peers, benchPeer(100<<8+k)) // 10.100.0.0/24 on
	}
	require.NoError(t, n.Apply(context.Background(), peers))
	for _, tb := range tables(n) {
		var st tableState
		allocs := testing.AllocsPerRun(5, func() { n.r.Locked(func() { st = n.check(n.memo, tb.k, tb.link, tb.v6) }) })
		want := tableInPlace
		if tb.link == n.env.Iface.Index {
			want = tableEmpty // no direct route
		}
		assert.Equal(t, want, st, tb.name)
		assert.LessOrEqual(t, allocs, 1.0, "allocations checking %s of 600 peers (the index's arrays are kept)", tb.name)
	}
	// The periodic resync of that node writes nothing and diffs nothing.
	mark := len(n0.Logs.String())
	n.r.Repair(context.Background(), backend.Periodic)
	var lines []string
	for l := range strings.Lines(n0.Logs.String()[mark:]) {
		if strings.Contains(l, "msg=programmed") {
			lines = append(lines, l)
		}
	}
	require.Len(t, lines, 1)
	assert.Contains(t, lines[0], "sets=0 deletes=0 tables_in_place=3 ", "FDB, neighbours and routes of flannel.1")
}

// TestJoinReusesOrder: the incremental path (a peer joining, then leaving)
// builds each memo book's order in the array of the book before the last,
// so a join at N peers allocates no array of N (BenchmarkJoin has the
// bytes), and the array it gives up keeps no memo alive.
func TestJoinReusesOrder(t *testing.T) {
	c := newCluster(t, netlab.Options{Nodes: 1}, Options{})
	n0 := c.Nodes[0]
	n := nw(n0)
	peers := []lease.Lease{n0.Lease}
	for k := range 50 {
		peers = append(peers, benchPeer(100<<8+k)) // 10.100.0.0/24 on
	}
	ctx := context.Background()
	require.NoError(t, n.Apply(ctx, peers))
	joined := append(slices.Clip(peers), lease.Lease{
		Subnet: netip.MustParsePrefix("10.200.0.0/24"),
		Attrs: lease.Attrs{BackendType: Type, PublicIP: netip.MustParseAddr("172.30.200.1"),
			BackendData: []byte(`{"VNI":1,"VtepMAC":"0a:00:00:00:c8:01"}`)},
	})
	var slots []**peerMemo // the first slot of each book's order array
	for i := range 4 {
		want := peers
		if i%2 == 0 {
			want = joined
		}
		require.NoError(t, n.Apply(ctx, want))
		require.NotEmpty(t, n.memo.order)
		slots = append(slots, &n.memo.order[0])
		require.NotNil(t, n.spare, "apply %d gave up the array of the book before", i)
		assert.Empty(t, n.spare, "and emptied it")
		assert.Nil(t, n.spare[:cap(n.spare)][0], "a given-up array holds no memo")
	}
	assert.NotSame(t, slots[0], slots[1], "a book is not built in the array it replaces")
	assert.Same(t, slots[0], slots[2], "the join reused the array of the book before the last")
	assert.Same(t, slots[1], slots[3])
}
