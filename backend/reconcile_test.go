package backend

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"slices"
	"strconv"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

// allRoutes renders every route of h's main table, both families, sorted,
// for before/after comparisons.
func allRoutes(t *testing.T, h *netlink.Handle) []string {
	t.Helper()
	rs, err := nlsafe.Wrap(h).RouteListFiltered(netlink.FAMILY_ALL, nil, 0)
	require.NoError(t, err)
	var out []string
	for _, r := range rs {
		out = append(out, FormatRoute(r)+" metric "+strconv.Itoa(r.Priority))
	}
	slices.Sort(out)
	return out
}

// owned renders the routes with our protocol on link.
func owned(t *testing.T, h *netlink.Handle, link int) []string {
	t.Helper()
	rs, err := (&RouteReconciler{}).Owned(h, link)
	require.NoError(t, err)
	var out []string
	for _, r := range rs {
		out = append(out, FormatRoute(r))
	}
	slices.Sort(out)
	return out
}

func TestRouteReconciler(t *testing.T) {
	_, h := newNS(t)
	eth0 := addVeth(t, h, "eth0", "192.0.2.10/24", "2001:db8:1::10/64")
	other := addVeth(t, h, "eth1", "198.51.100.10/24")
	idx := eth0.Attrs().Index
	mk := func(dst, gw string) netlink.Route {
		return netlink.Route{Dst: ipconv.IPNetFromPrefix(netip.MustParsePrefix(dst)), Gw: ipconv.IPFromAddr(netip.MustParseAddr(gw))}
	}
	add := func(r netlink.Route, proto netlink.RouteProtocol, link int) {
		r.Protocol, r.LinkIndex = proto, link
		require.NoError(t, h.RouteAdd(&r), "add %s", FormatRoute(r))
	}
	// Left over from a previous run: ours, on eth0 and on eth1.
	add(mk("10.244.9.0/24", "192.0.2.19"), RouteProtocol, idx)
	add(mk("fd00:10:244:9::/64", "2001:db8:1::19"), RouteProtocol, idx)
	add(mk("10.244.7.0/24", "198.51.100.17"), RouteProtocol, other.Attrs().Index)
	// Not ours, same link: a static route, and a boot route for a desired
	// destination with another metric.
	add(mk("10.244.8.0/24", "192.0.2.18"), unix.RTPROT_STATIC, idx)
	notOurs := mk("10.244.1.0/24", "192.0.2.99")
	notOurs.Priority = 500
	add(notOurs, unix.RTPROT_BOOT, idx)

	desired := []netlink.Route{
		mk("10.244.1.0/24", "192.0.2.11"),
		mk("10.244.2.0/24", "192.0.2.12"),
		mk("fd00:10:244:1::/64", "2001:db8:1::11"),
	}
	wantOwned := []string{
		"10.244.1.0/24 via 192.0.2.11 dev " + strconv.Itoa(idx) + " proto 101",
		"10.244.2.0/24 via 192.0.2.12 dev " + strconv.Itoa(idx) + " proto 101",
		"fd00:10:244:1::/64 via 2001:db8:1::11 dev " + strconv.Itoa(idx) + " proto 101",
	}
	var r RouteReconciler
	ctx := context.Background()

	require.NoError(t, r.Reconcile(ctx, h, idx, desired))
	assert.Equal(t, wantOwned, owned(t, h, idx), "stale removed, desired added")
	all := allRoutes(t, h)
	assert.Contains(t, all, "10.244.8.0/24 via 192.0.2.18 dev "+strconv.Itoa(idx)+" proto static metric 0", "static route left alone")
	assert.Contains(t, all, "10.244.1.0/24 via 192.0.2.99 dev "+strconv.Itoa(idx)+" proto boot metric 500", "route of another owner left alone")
	assert.Equal(t, []string{"10.244.7.0/24 via 198.51.100.17 dev " + strconv.Itoa(other.Attrs().Index) + " proto 101"}, owned(t, h, other.Attrs().Index), "other links untouched")

	t.Run("second run changes nothing", func(t *testing.T) {
		before := allRoutes(t, h)
		require.NoError(t, r.Reconcile(ctx, h, idx, desired))
		assert.Equal(t, before, allRoutes(t, h))
	})

	t.Run("route deleted by hand is restored", func(t *testing.T) {
		gone := mk("10.244.2.0/24", "192.0.2.12")
		gone.LinkIndex, gone.Protocol = idx, RouteProtocol
		require.NoError(t, h.RouteDel(&gone))
		gone6 := mk("fd00:10:244:1::/64", "2001:db8:1::11")
		gone6.LinkIndex, gone6.Protocol = idx, RouteProtocol
		require.NoError(t, h.RouteDel(&gone6))
		require.NoError(t, r.Reconcile(ctx, h, idx, desired))
		assert.Equal(t, wantOwned, owned(t, h, idx))
	})

	t.Run("route changed by hand is fixed", func(t *testing.T) {
		wrong := mk("10.244.1.0/24", "192.0.2.77")
		wrong.LinkIndex, wrong.Protocol = idx, RouteProtocol
		require.NoError(t, h.RouteReplace(&wrong))
		require.NoError(t, r.Reconcile(ctx, h, idx, desired))
		assert.Equal(t, wantOwned, owned(t, h, idx))
	})

	t.Run("failed route is named, others programmed", func(t *testing.T) {
		bad := mk("10.244.5.0/24", "203.0.113.1") // gateway not on eth0's segment
		bad6 := mk("fd00:10:244:5::/64", "2001:db8:99::1")
		err := r.Reconcile(ctx, h, idx, append([]netlink.Route{bad, bad6}, desired...))
		require.Error(t, err)
		var failed []string
		for _, e := range err.(interface{ Unwrap() []error }).Unwrap() {
			var re *RouteError
			require.True(t, errors.As(e, &re), "%v is a *RouteError", e)
			assert.Equal(t, "replace", re.Op)
			failed = append(failed, re.Route.Dst.String())
		}
		assert.ElementsMatch(t, []string{"10.244.5.0/24", "fd00:10:244:5::/64"}, failed)
		assert.ErrorIs(t, err, unix.ENETUNREACH, "ipv4: gateway not on link")
		assert.ErrorIs(t, err, unix.EHOSTUNREACH, "ipv6: gateway not on link")
		assert.Contains(t, err.Error(), "replace route 10.244.5.0/24 via 203.0.113.1")
		assert.Equal(t, wantOwned, owned(t, h, idx), "the other routes are in place")
	})

	t.Run("cancelled context stops before changes", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		cancel()
		err := r.Reconcile(cctx, h, idx, append(desired, mk("10.244.3.0/24", "192.0.2.13")))
		assert.ErrorIs(t, err, context.Canceled)
		assert.Equal(t, wantOwned, owned(t, h, idx))
	})

	t.Run("empty desired removes only ours on the link", func(t *testing.T) {
		require.NoError(t, r.Reconcile(ctx, h, idx, nil))
		assert.Empty(t, owned(t, h, idx))
		all := allRoutes(t, h)
		assert.Contains(t, all, "10.244.8.0/24 via 192.0.2.18 dev "+strconv.Itoa(idx)+" proto static metric 0")
		assert.Contains(t, all, "10.244.1.0/24 via 192.0.2.99 dev "+strconv.Itoa(idx)+" proto boot metric 500")
		assert.Len(t, owned(t, h, other.Attrs().Index), 1)
	})

	t.Run("link 0 covers every link", func(t *testing.T) {
		require.NoError(t, r.Reconcile(ctx, h, 0, nil))
		assert.Empty(t, owned(t, h, 0))
	})
}

func TestRouteReconcilerOwnProtocolAndTable(t *testing.T) {
	_, h := newNS(t)
	eth0 := addVeth(t, h, "eth0", "192.0.2.10/24")
	idx := eth0.Attrs().Index
	r := RouteReconciler{Protocol: 150, Table: 100}
	want := netlink.Route{Dst: ipconv.IPNetFromPrefix(netip.MustParsePrefix("10.244.1.0/24")), Gw: net.ParseIP("192.0.2.11").To4()}
	require.NoError(t, r.Reconcile(context.Background(), h, idx, []netlink.Route{want}))
	got, err := r.Owned(h, idx)
	require.NoError(t, err)
	require.Len(t, got, 1)
	assert.Equal(t, 100, got[0].Table)
	assert.Equal(t, netlink.RouteProtocol(150), got[0].Protocol)
	assert.Empty(t, owned(t, h, idx), "nothing with the default protocol in the main table")
}
