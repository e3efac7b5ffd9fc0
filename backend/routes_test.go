package backend

import (
	"net"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/internal/ipconv"
)

// rt builds a route for table tests: dst, gateway ("" for none), link.
func rt(dst, gw string, link int) netlink.Route {
	r := netlink.Route{Dst: ipconv.IPNetFromPrefix(netip.MustParsePrefix(dst)), LinkIndex: link}
	if gw != "" {
		r.Gw = ipconv.IPFromAddr(netip.MustParseAddr(gw))
	}
	return r
}

func with(r netlink.Route, f func(*netlink.Route)) netlink.Route {
	f(&r)
	return r
}

func dsts(rs []netlink.Route) []string {
	out := []string{}
	for _, r := range rs {
		out = append(out, FormatRoute(r))
	}
	return out
}

func TestDiffRoutes(t *testing.T) {
	a := rt("10.244.1.0/24", "172.30.0.11", 2)
	b := rt("10.244.2.0/24", "172.30.0.12", 2)
	c6 := rt("fd00:10:244:3::/64", "fd00:172:30::c", 2)
	// What the kernel reports back for a: protocol, table, family, type.
	aKernel := with(a, func(r *netlink.Route) {
		r.Protocol, r.Table, r.Family, r.Type = RouteProtocol, unix.RT_TABLE_MAIN, netlink.FAMILY_V4, unix.RTN_UNICAST
	})
	c6Kernel := with(c6, func(r *netlink.Route) {
		r.Protocol, r.Table, r.Family, r.Priority = RouteProtocol, unix.RT_TABLE_MAIN, netlink.FAMILY_V6, 1024
	})
	tests := []struct {
		name             string
		desired, actual  []netlink.Route
		wantAdd, wantDel []netlink.Route
	}{
		{name: "both empty"},
		{name: "all missing", desired: []netlink.Route{a, b, c6}, wantAdd: []netlink.Route{a, b, c6}},
		{name: "all stale", actual: []netlink.Route{a, c6}, wantDel: []netlink.Route{a, c6}},
		{name: "equal as the kernel reports it", desired: []netlink.Route{a, c6}, actual: []netlink.Route{aKernel, c6Kernel}},
		{
			name: "one missing one stale one kept", desired: []netlink.Route{a, b}, actual: []netlink.Route{aKernel, c6Kernel},
			wantAdd: []netlink.Route{b}, wantDel: []netlink.Route{c6Kernel},
		},
		{
			name: "other gateway is replaced", desired: []netlink.Route{with(a, func(r *netlink.Route) { r.Gw = net.ParseIP("172.30.0.99") })},
			actual:  []netlink.Route{aKernel},
			wantAdd: []netlink.Route{with(a, func(r *netlink.Route) { r.Gw = net.ParseIP("172.30.0.99") })},
		},
		{
			name: "other link is replaced", desired: []netlink.Route{with(a, func(r *netlink.Route) { r.LinkIndex = 7 })},
			actual:  []netlink.Route{aKernel},
			wantAdd: []netlink.Route{with(a, func(r *netlink.Route) { r.LinkIndex = 7 })},
		},
		{
			name: "onlink flag is replaced", desired: []netlink.Route{with(a, func(r *netlink.Route) { r.Flags = unix.RTNH_F_ONLINK })},
			actual:  []netlink.Route{aKernel},
			wantAdd: []netlink.Route{with(a, func(r *netlink.Route) { r.Flags = unix.RTNH_F_ONLINK })},
		},
		{
			name: "kernel-only flags are ignored", desired: []netlink.Route{a},
			actual: []netlink.Route{with(aKernel, func(r *netlink.Route) { r.Flags = unix.RTNH_F_LINKDOWN })},
		},
		{
			name: "mtu is replaced", desired: []netlink.Route{with(a, func(r *netlink.Route) { r.MTU = 1400 })},
			actual:  []netlink.Route{aKernel},
			wantAdd: []netlink.Route{with(a, func(r *netlink.Route) { r.MTU = 1400 })},
		},
		{
			name: "other metric is added and the old one deleted", desired: []netlink.Route{with(a, func(r *netlink.Route) { r.Priority = 50 })},
			actual:  []netlink.Route{aKernel},
			wantAdd: []netlink.Route{with(a, func(r *netlink.Route) { r.Priority = 50 })},
			wantDel: []netlink.Route{aKernel},
		},
		{
			name: "desired duplicates collapse to the first", desired: []netlink.Route{a, with(a, func(r *netlink.Route) { r.Gw = net.ParseIP("172.30.0.99") }), a},
			wantAdd: []netlink.Route{a},
		},
		{
			name: "actual duplicates of a key are deleted", desired: []netlink.Route{a},
			actual:  []netlink.Route{aKernel, with(aKernel, func(r *netlink.Route) { r.Priority = 9 })},
			wantDel: []netlink.Route{with(aKernel, func(r *netlink.Route) { r.Priority = 9 })},
		},
		{
			name: "same destination in another table is another route", desired: []netlink.Route{a},
			actual:  []netlink.Route{aKernel, with(aKernel, func(r *netlink.Route) { r.Table = 100 })},
			wantDel: []netlink.Route{with(aKernel, func(r *netlink.Route) { r.Table = 100 })},
		},
		{
			name: "ipv4 in 16-byte form equals 4-byte form", desired: []netlink.Route{{
				Dst: &net.IPNet{IP: net.ParseIP("10.244.1.0"), Mask: net.CIDRMask(24, 32)}, Gw: net.ParseIP("172.30.0.11"), LinkIndex: 2,
			}},
			actual: []netlink.Route{aKernel},
		},
		{
			name: "default routes of both families are distinct",
			desired: []netlink.Route{
				{Family: netlink.FAMILY_V4, Gw: net.ParseIP("172.30.0.1"), LinkIndex: 2},
				{Family: netlink.FAMILY_V6, Gw: net.ParseIP("fd00::1"), LinkIndex: 2},
			},
			actual:  []netlink.Route{{Family: netlink.FAMILY_V4, Dst: ipconv.IPNetFromPrefix(netip.MustParsePrefix("0.0.0.0/0")), Gw: net.IPv4(172, 30, 0, 1).To4(), LinkIndex: 2}},
			wantAdd: []netlink.Route{{Family: netlink.FAMILY_V6, Gw: net.ParseIP("fd00::1"), LinkIndex: 2}},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			add, del := DiffRoutes(tc.desired, tc.actual)
			assert.Equal(t, dsts(tc.wantAdd), dsts(add), "add")
			assert.Equal(t, dsts(tc.wantDel), dsts(del), "del")
			// Applying the diff to actual yields desired: a second diff is empty.
			after := applyDiff(tc.actual, add, del)
			add2, del2 := DiffRoutes(tc.desired, after)
			assert.Empty(t, add2, "second add")
			assert.Empty(t, del2, "second del")
		})
	}
}

// applyDiff simulates the kernel: del removes exact routes, add replaces
// the route with the same key and metric or appends.
func applyDiff(actual, add, del []netlink.Route) []netlink.Route {
	var out []netlink.Route
	for _, r := range actual {
		gone := false
		for _, d := range del {
			if FormatRoute(d) == FormatRoute(r) && priorityOf(d) == priorityOf(r) && tableOf(d) == tableOf(r) {
				gone = true
			}
		}
		if !gone {
			out = append(out, r)
		}
	}
	for _, a := range add {
		replaced := false
		for i, r := range out {
			if keyOf(r) == keyOf(a) && priorityOf(r) == priorityOf(a) {
				out[i], replaced = a, true
				break
			}
		}
		if !replaced {
			out = append(out, a)
		}
	}
	return out
}

func TestRouteErrorNamesTheRoute(t *testing.T) {
	e := &RouteError{Op: "replace", Route: with(rt("10.244.1.0/24", "172.30.1.11", 3), func(r *netlink.Route) { r.Protocol = RouteProtocol }), Err: unix.ENETUNREACH}
	assert.Equal(t, "replace route 10.244.1.0/24 via 172.30.1.11 dev 3 proto 101: network is unreachable", e.Error())
	assert.ErrorIs(t, e, unix.ENETUNREACH)
}
