package nlsafe_test

import (
	"net"
	"net/netip"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

// node builds a one-node lab (IPv4 and IPv6 underlay) and returns the node
// with a Handle bound to its namespace.
func node(t *testing.T) (*netlab.Node, nlsafe.Handle) {
	t.Helper()
	lab := netlab.NewT(t, netlab.Options{Nodes: 1, IPv4: true, IPv6: true})
	n := lab.Nodes[0]
	return n, nlsafe.New(n.Handle, n.NS)
}

// fixture is a set of entries of every kind a Handle dumps, on the node's
// underlay link.
type fixture struct {
	link   netlink.Link
	route  netlink.Route // main table, protocol 101
	route2 netlink.Route // table 100
	neigh  netlink.Neigh
	policy netlink.XfrmPolicy
}

func addFixture(t *testing.T, n *netlab.Node, h nlsafe.Handle) fixture {
	t.Helper()
	link, err := h.LinkByName(n.Iface)
	require.NoError(t, err)
	f := fixture{link: link}
	f.route = netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipconv.IPNetFromPrefix(netip.MustParsePrefix("10.99.1.0/24")),
		Gw: net.IPv4(172, 30, 0, 99).To4(), Protocol: 101}
	require.NoError(t, h.RouteAdd(&f.route))
	f.route2 = netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipconv.IPNetFromPrefix(netip.MustParsePrefix("10.99.2.0/24")), Table: 100}
	require.NoError(t, h.RouteAdd(&f.route2))
	f.neigh = netlink.Neigh{LinkIndex: link.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
		IP: net.IPv4(172, 30, 0, 99).To4(), HardwareAddr: net.HardwareAddr{0x02, 0, 0, 0, 0, 0x99}}
	require.NoError(t, h.NeighSet(&f.neigh))
	f.policy = netlink.XfrmPolicy{
		Src: ipconv.IPNetFromPrefix(netip.MustParsePrefix("10.1.0.0/24")),
		Dst: ipconv.IPNetFromPrefix(netip.MustParsePrefix("10.2.0.0/24")),
		Dir: netlink.XFRM_DIR_OUT,
		Tmpls: []netlink.XfrmPolicyTmpl{{Src: net.IPv4(172, 30, 0, 10).To4(), Dst: net.IPv4(172, 30, 0, 99).To4(),
			Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: 1}},
	}
	require.NoError(t, h.XfrmPolicyAdd(&f.policy))
	return f
}

// dumps lists every kind through h and reports what failed; ok results are
// checked against the fixture.
func dumps(t *testing.T, n *netlab.Node, h nlsafe.Handle, f fixture) map[string]error {
	t.Helper()
	errs := map[string]error{}
	links, err := h.LinkList()
	if errs["links"] = err; err == nil {
		assert.Contains(t, names(links), n.Iface)
		assert.Contains(t, names(links), "lo")
	} else {
		assert.Nil(t, links)
	}
	addrs, err := h.AddrList(f.link, netlink.FAMILY_ALL)
	if errs["addrs"] = err; err == nil {
		assert.Contains(t, addrIPs(addrs), n.IP)
		assert.Contains(t, addrIPs(addrs), n.IPv6)
	}
	all, err := h.AddrList(nil, netlink.FAMILY_V4)
	if errs["all addrs"] = err; err == nil {
		assert.Contains(t, addrIPs(all), n.IP)
		assert.Contains(t, addrIPs(all), netip.MustParseAddr("127.0.0.1"))
		assert.NotContains(t, addrIPs(all), n.IPv6)
	}
	routes, err := h.RouteList(f.link, netlink.FAMILY_V4)
	if errs["routes"] = err; err == nil {
		assert.Contains(t, dsts(routes), "10.99.1.0/24")
		assert.NotContains(t, dsts(routes), "10.99.2.0/24", "main table only")
	}
	filter := netlink.Route{Protocol: 101}
	routes, err = h.RouteListFiltered(netlink.FAMILY_ALL, &filter, netlink.RT_FILTER_PROTOCOL)
	if errs["filtered routes"] = err; err == nil {
		assert.Equal(t, []string{"10.99.1.0/24"}, dsts(routes))
		assert.Equal(t, netlink.Route{Protocol: 101}, filter, "filter not written to")
	}
	routes, err = h.RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Table: 100}, netlink.RT_FILTER_TABLE)
	if errs["table routes"] = err; err == nil {
		assert.Equal(t, []string{"10.99.2.0/24"}, dsts(routes))
	}
	routes, err = h.RouteListFiltered(netlink.FAMILY_V4, nil, 0)
	if errs["unfiltered routes"] = err; err == nil {
		assert.Contains(t, dsts(routes), "10.99.1.0/24")
	}
	// Each: begin before every attempt, so an interrupted one's routes go.
	var each []netlink.Route
	begins := 0
	err = h.RouteListFilteredEach(netlink.FAMILY_ALL, &filter, netlink.RT_FILTER_PROTOCOL,
		func() { begins++; each = each[:0] }, func(r netlink.Route) { each = append(each, r) })
	if errs["routes each"] = err; err == nil {
		assert.Equal(t, []string{"10.99.1.0/24"}, dsts(each))
		assert.Positive(t, begins)
	}
	neighs, err := h.NeighList(f.link.Attrs().Index, netlink.FAMILY_V4)
	if errs["neighs"] = err; err == nil {
		assert.True(t, slices.ContainsFunc(neighs, func(x netlink.Neigh) bool { return x.IP.Equal(f.neigh.IP) }), "neighbour listed")
	}
	var seen []netlink.Neigh
	err = h.NeighListEach(f.link.Attrs().Index, netlink.FAMILY_V4, func() { seen = seen[:0] }, func(x netlink.Neigh) {
		x.IP, x.HardwareAddr = slices.Clone(x.IP), slices.Clone(x.HardwareAddr)
		seen = append(seen, x)
	})
	if errs["neighs each"] = err; err == nil {
		assert.True(t, slices.ContainsFunc(seen, func(x netlink.Neigh) bool {
			return x.IP.Equal(f.neigh.IP) && x.HardwareAddr.String() == f.neigh.HardwareAddr.String() && x.State == netlink.NUD_PERMANENT
		}), "neighbour walked")
		for _, x := range seen {
			assert.Equal(t, f.link.Attrs().Index, x.LinkIndex, "only the link's")
			assert.Equal(t, netlink.FAMILY_V4, x.Family, "only the family's")
		}
	}
	policies, err := h.XfrmPolicyList(netlink.FAMILY_ALL)
	if errs["xfrm policies"] = err; err == nil {
		require.Len(t, policies, 1)
		assert.Equal(t, f.policy.Dst.String(), policies[0].Dst.String())
	}
	states, err := h.XfrmStateList(netlink.FAMILY_ALL)
	if errs["xfrm states"] = err; err == nil {
		assert.Empty(t, states)
	}
	return errs
}

func TestDumps(t *testing.T) {
	t.Parallel()
	n, h := node(t)
	f := addFixture(t, n, h)
	for what, err := range dumps(t, n, h, f) {
		assert.NoError(t, err, what)
	}
}

// TestDumpsRetryInterrupted injects interrupted dumps (as the kernel's
// NLM_F_DUMP_INTR makes netlink return) into every dump method.
func TestDumpsRetryInterrupted(t *testing.T) {
	t.Parallel()
	n, h := node(t)
	f := addFixture(t, n, h)

	attempts := map[string]int{}
	flaky := nlsafe.WithInterrupts(h, func(what string) bool {
		attempts[what]++
		return attempts[what]%3 != 0 // two interrupted tries, then one that counts
	})
	for what, err := range dumps(t, n, flaky, f) {
		assert.NoError(t, err, "%s: interrupted twice, then read", what)
	}
	for what, k := range attempts {
		assert.Zero(t, k%3, "%s: every dump retried until it was read whole", what)
	}

	broken := nlsafe.WithInterrupts(h, func(string) bool { return true })
	for what, err := range dumps(t, n, broken, f) {
		assert.ErrorIs(t, err, netlink.ErrDumpInterrupted, what)
		assert.ErrorContains(t, err, "5 attempts", what)
	}
}

// TestDumpsWithoutNamespace: a Handle from Wrap lists through the netlink
// handle alone (NeighListEach then walks the handle's list).
func TestDumpsWithoutNamespace(t *testing.T) {
	t.Parallel()
	n, h := node(t)
	f := addFixture(t, n, h)
	for what, err := range dumps(t, n, nlsafe.Wrap(n.Handle), f) {
		assert.NoError(t, err, what)
	}
}

func TestOpen(t *testing.T) {
	t.Parallel()
	n, _ := node(t)
	h, err := nlsafe.Open(n.NS)
	require.NoError(t, err)
	defer h.Close()
	assert.True(t, h.NS().Equal(n.NS))
	links, err := h.LinkList()
	require.NoError(t, err)
	assert.Contains(t, names(links), n.Iface)

	_, err = nlsafe.Open(nlsafe.Wrap(nil).NS())
	assert.ErrorContains(t, err, "not open")

	// The process's own namespace: opened without setns, and it is not the
	// lab's (the lab node's underlay link is not there).
	cur, err := netns.Get()
	require.NoError(t, err)
	defer cur.Close()
	here, err := nlsafe.Open(cur)
	require.NoError(t, err)
	defer here.Close()
	assert.True(t, here.NS().Equal(cur))
	require.NoError(t, h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "open0"}, PeerName: "open0p"}))
	hostLinks, err := here.LinkList()
	require.NoError(t, err)
	assert.NotContains(t, names(hostLinks), "open0")
	labLinks, err := h.LinkList()
	require.NoError(t, err)
	assert.Contains(t, names(labLinks), "open0")
}

func TestWrapHasNoNamespace(t *testing.T) {
	t.Parallel()
	n, _ := node(t)
	h := nlsafe.Wrap(n.Handle)
	assert.False(t, h.NS().IsOpen())
	ran := false
	assert.Error(t, h.Do(func() error { ran = true; return nil }))
	assert.False(t, ran, "fn not run without a namespace")
	links, err := h.LinkList()
	require.NoError(t, err, "dumps work without the namespace")
	assert.Contains(t, names(links), n.Iface)

	// A Handle built as a literal has no namespace either (not fd 0).
	assert.False(t, nlsafe.Handle{Handle: n.Handle}.NS().IsOpen())
}

func names(links []netlink.Link) []string {
	var out []string
	for _, l := range links {
		out = append(out, l.Attrs().Name)
	}
	return out
}

func addrIPs(addrs []netlink.Addr) []netip.Addr {
	var out []netip.Addr
	for _, a := range addrs {
		out = append(out, ipconv.AddrFromIP(a.IP))
	}
	return out
}

func dsts(routes []netlink.Route) []string {
	var out []string
	for _, r := range routes {
		if p, ok := ipconv.PrefixFromIPNet(r.Dst); ok {
			out = append(out, p.String())
		}
	}
	return out
}
