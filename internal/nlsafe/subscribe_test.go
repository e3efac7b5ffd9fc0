package nlsafe_test

import (
	"net"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

// waitFor reads ch until match accepts an update, then closes done and
// drains ch until the subscription closes it (its receiver has exited).
// The timeout only bounds a failing test.
func waitFor[T any](t *testing.T, ch chan T, done chan struct{}, match func(T) bool) {
	t.Helper()
	timeout := time.After(time.Minute)
	for found := false; !found; {
		select {
		case u, ok := <-ch:
			require.True(t, ok, "subscription ended early")
			found = match(u)
		case <-timeout:
			t.Fatal("no matching update")
		}
	}
	close(done)
	for {
		select {
		case _, ok := <-ch:
			if !ok {
				return
			}
		case <-timeout:
			t.Fatal("subscription did not close its channel")
		}
	}
}

// subscribe opens sub in h's namespace; errors it reports fail the test
// unless the test is over.
func subscribe[T any](t *testing.T, h nlsafe.Handle,
	sub func(chan T, chan struct{}, netns.NsHandle, func(error)) error) (chan T, chan struct{}) {
	t.Helper()
	ch, done := make(chan T, 64), make(chan struct{})
	require.NoError(t, sub(ch, done, h.NS(), func(err error) {
		select {
		case <-done:
		default:
			t.Errorf("subscription error: %v", err)
		}
	}))
	return ch, done
}

func TestSubscribeLinks(t *testing.T) {
	t.Parallel()
	_, h := node(t)
	ch, done := subscribe(t, h, nlsafe.SubscribeLinks)
	require.NoError(t, h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "sub0"}, PeerName: "sub0p"}))
	waitFor(t, ch, done, func(u netlink.LinkUpdate) bool { return u.Attrs().Name == "sub0" })
}

func TestSubscribeRoutesAndNeighs(t *testing.T) {
	t.Parallel()
	n, h := node(t)
	link, err := h.LinkByName(n.Iface)
	require.NoError(t, err)
	rch, rdone := subscribe(t, h, nlsafe.SubscribeRoutes)
	nch, ndone := subscribe(t, h, nlsafe.SubscribeNeighDeletes)

	dst := netip.MustParsePrefix("10.98.0.0/24")
	require.NoError(t, h.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipconv.IPNetFromPrefix(dst)}))
	waitFor(t, rch, rdone, func(u netlink.RouteUpdate) bool {
		p, ok := ipconv.PrefixFromIPNet(u.Dst)
		return ok && p == dst
	})
	ip := net.IPv4(172, 30, 0, 98).To4()
	require.NoError(t, h.NeighSet(&netlink.Neigh{LinkIndex: link.Attrs().Index, Family: netlink.FAMILY_V4,
		State: netlink.NUD_PERMANENT, IP: ip, HardwareAddr: net.HardwareAddr{0x02, 0, 0, 0, 0, 0x98}}))
	other := net.IPv4(172, 30, 0, 99).To4()
	require.NoError(t, h.NeighSet(&netlink.Neigh{LinkIndex: link.Attrs().Index, Family: netlink.FAMILY_V4,
		State: netlink.NUD_PERMANENT, IP: other, HardwareAddr: net.HardwareAddr{0x02, 0, 0, 0, 0, 0x99}}))
	require.NoError(t, h.NeighDel(&netlink.Neigh{LinkIndex: link.Attrs().Index, Family: netlink.FAMILY_V4, IP: ip}))
	// Only deletions come: the first update is the delete of ip, not
	// either addition.
	var first netlink.NeighUpdate
	waitFor(t, nch, ndone, func(u netlink.NeighUpdate) bool { first = u; return true })
	assert.Equal(t, uint16(unix.RTM_DELNEIGH), first.Type)
	assert.True(t, first.IP.Equal(ip), "got %s", first.IP)
}

// TestSubscribeRouteDeletes: only deletions come, decoded with what the
// repair watchers look at.
func TestSubscribeRouteDeletes(t *testing.T) {
	t.Parallel()
	n, h := node(t)
	link, err := h.LinkByName(n.Iface)
	require.NoError(t, err)
	ch, done := subscribe(t, h, nlsafe.SubscribeRouteDeletes)
	gone := &netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipconv.IPNetFromPrefix(netip.MustParsePrefix("10.97.0.0/24")),
		Gw: net.IPv4(192, 0, 2, 1).To4(), Flags: int(netlink.FLAG_ONLINK), Protocol: 77, Priority: 5, Table: 100}
	require.NoError(t, h.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Dst: ipconv.IPNetFromPrefix(netip.MustParsePrefix("10.97.1.0/24"))}))
	require.NoError(t, h.RouteAdd(gone))
	require.NoError(t, h.RouteDel(gone))
	v6 := &netlink.Route{Dst: ipconv.IPNetFromPrefix(netip.MustParsePrefix("fd00:97::/64")), Type: unix.RTN_BLACKHOLE}
	require.NoError(t, h.RouteAdd(v6))
	require.NoError(t, h.RouteDel(v6))
	var got []netlink.RouteUpdate
	waitFor(t, ch, done, func(u netlink.RouteUpdate) bool { got = append(got, u); return len(got) == 2 })
	require.Len(t, got, 2)
	u := got[0]
	assert.Equal(t, uint16(unix.RTM_DELROUTE), u.Type, "the additions are not delivered")
	assert.Equal(t, "10.97.0.0/24", u.Dst.String())
	assert.True(t, u.Gw.Equal(gone.Gw))
	assert.Equal(t, link.Attrs().Index, u.LinkIndex)
	assert.Equal(t, netlink.RouteProtocol(77), u.Protocol)
	assert.Equal(t, 5, u.Priority)
	assert.Equal(t, 100, u.Table)
	assert.Equal(t, netlink.FAMILY_V4, u.Family)
	assert.Equal(t, "fd00:97::/64", got[1].Dst.String())
	assert.Equal(t, unix.RTN_BLACKHOLE, got[1].Route.Type)
}

func TestSubscribeXfrm(t *testing.T) {
	t.Parallel()
	_, h := node(t)
	ch, done := subscribe(t, h, nlsafe.SubscribeXfrm)
	policy := &netlink.XfrmPolicy{
		Src: ipconv.IPNetFromPrefix(netip.MustParsePrefix("10.1.0.0/24")),
		Dst: ipconv.IPNetFromPrefix(netip.MustParsePrefix("10.2.0.0/24")),
		Dir: netlink.XFRM_DIR_OUT,
	}
	require.NoError(t, h.XfrmPolicyAdd(policy))
	waitFor(t, ch, done, func(m nl.XfrmMsgType) bool { return m == nl.XFRM_MSG_NEWPOLICY })
}

func TestSubscribeOnlySeesItsNamespace(t *testing.T) {
	t.Parallel()
	_, a := node(t)
	_, b := node(t)
	ch, done := subscribe(t, a, nlsafe.SubscribeLinks)
	require.NoError(t, b.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "other0"}, PeerName: "other0p"}))
	require.NoError(t, a.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "mine0"}, PeerName: "mine0p"}))
	waitFor(t, ch, done, func(u netlink.LinkUpdate) bool {
		assert.NotContains(t, []string{"other0", "other0p"}, u.Attrs().Name, "update from another namespace")
		return u.Attrs().Name == "mine0"
	})
}
