package backend

import (
	"errors"
	"net"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/internal/ipconv"
)

// ifaceLab builds, in a throwaway namespace:
//
//	eth0  up, 192.0.2.10/24 + 192.0.2.20/24, 2001:db8:1::10/64, MTU 1400,
//	      default routes via 192.0.2.1 and 2001:db8:1::1,
//	      203.0.113.0/24 via 192.0.2.1 src 192.0.2.20
//	ens5  up, 198.51.100.7/24 (IPv4 only)
//	wlan0 down, 203.0.113.5/24
func ifaceLab(t *testing.T) *netlink.Handle {
	_, h := newNS(t)
	eth0 := addVeth(t, h, "eth0", "192.0.2.10/24", "192.0.2.20/24", "2001:db8:1::10/64")
	require.NoError(t, h.LinkSetMTU(eth0, 1400))
	addVeth(t, h, "ens5", "198.51.100.7/24")
	wlan := addVeth(t, h, "wlan0", "203.0.113.5/24")
	require.NoError(t, h.LinkSetDown(wlan))

	for _, r := range []netlink.Route{
		{LinkIndex: eth0.Attrs().Index, Gw: net.ParseIP("192.0.2.1").To4()},
		{LinkIndex: eth0.Attrs().Index, Gw: net.ParseIP("2001:db8:1::1")},
		{LinkIndex: eth0.Attrs().Index, Dst: ipconv.IPNetFromPrefix(netip.MustParsePrefix("203.0.113.0/24")), Gw: net.ParseIP("192.0.2.1").To4(), Src: net.ParseIP("192.0.2.20").To4()},
	} {
		require.NoError(t, h.RouteAdd(&r), "add route %s", FormatRoute(r))
	}
	return h
}

func TestFindInterface(t *testing.T) {
	h := ifaceLab(t)
	a := netip.MustParseAddr
	tests := []struct {
		name       string
		opts       InterfaceOptions
		wantName   string
		wantIP     netip.Addr
		wantIPv6   netip.Addr
		wantPublic netip.Addr
		wantPub6   netip.Addr
	}{
		{name: "default route ipv4", opts: InterfaceOptions{}, wantName: "eth0", wantIP: a("192.0.2.10"), wantPublic: a("192.0.2.10")},
		{name: "default route ipv6 only", opts: InterfaceOptions{IPv6: true}, wantName: "eth0", wantIPv6: a("2001:db8:1::10"), wantPub6: a("2001:db8:1::10")},
		{
			name: "default route dual stack", opts: InterfaceOptions{IPv4: true, IPv6: true}, wantName: "eth0",
			wantIP: a("192.0.2.10"), wantIPv6: a("2001:db8:1::10"), wantPublic: a("192.0.2.10"), wantPub6: a("2001:db8:1::10"),
		},
		{name: "by name", opts: InterfaceOptions{Names: []string{"ens5"}}, wantName: "ens5", wantIP: a("198.51.100.7"), wantPublic: a("198.51.100.7")},
		{name: "names in order, missing skipped", opts: InterfaceOptions{Names: []string{"eth9", "ens5", "eth0"}}, wantName: "ens5", wantIP: a("198.51.100.7"), wantPublic: a("198.51.100.7")},
		{name: "name lacking a family is skipped", opts: InterfaceOptions{Names: []string{"ens5", "eth0"}, IPv4: true, IPv6: true}, wantName: "eth0", wantIP: a("192.0.2.10"), wantIPv6: a("2001:db8:1::10"), wantPublic: a("192.0.2.10"), wantPub6: a("2001:db8:1::10")},
		{name: "name is an ip", opts: InterfaceOptions{Names: []string{"198.51.100.7"}}, wantName: "ens5", wantIP: a("198.51.100.7"), wantPublic: a("198.51.100.7")},
		{name: "name is a secondary ip, which is picked", opts: InterfaceOptions{Names: []string{"192.0.2.20"}}, wantName: "eth0", wantIP: a("192.0.2.20"), wantPublic: a("192.0.2.20")},
		{name: "name is an ipv6", opts: InterfaceOptions{Names: []string{"2001:db8:1::10"}, IPv6: true}, wantName: "eth0", wantIPv6: a("2001:db8:1::10"), wantPub6: a("2001:db8:1::10")},
		{name: "regex on name", opts: InterfaceOptions{Regexes: []string{"^ens"}}, wantName: "ens5", wantIP: a("198.51.100.7"), wantPublic: a("198.51.100.7")},
		{name: "regex on address", opts: InterfaceOptions{Regexes: []string{`^198\.51\.`}}, wantName: "ens5", wantIP: a("198.51.100.7"), wantPublic: a("198.51.100.7")},
		{name: "regex on secondary address picks it", opts: InterfaceOptions{Regexes: []string{`^192\.0\.2\.20$`}}, wantName: "eth0", wantIP: a("192.0.2.20"), wantPublic: a("192.0.2.20")},
		{name: "regexes in order", opts: InterfaceOptions{Regexes: []string{"^wlan", "^eth"}}, wantName: "eth0", wantIP: a("192.0.2.10"), wantPublic: a("192.0.2.10")},
		{name: "can reach on link", opts: InterfaceOptions{CanReach: a("198.51.100.99")}, wantName: "ens5", wantIP: a("198.51.100.7"), wantPublic: a("198.51.100.7")},
		{name: "can reach takes the route's source", opts: InterfaceOptions{CanReach: a("203.0.113.9")}, wantName: "eth0", wantIP: a("192.0.2.20"), wantPublic: a("192.0.2.20")},
		{name: "can reach ipv6", opts: InterfaceOptions{CanReach: a("2001:db8:99::1"), IPv6: true}, wantName: "eth0", wantIPv6: a("2001:db8:1::10"), wantPub6: a("2001:db8:1::10")},
		{
			name: "public ip overrides", opts: InterfaceOptions{PublicIP: a("203.0.113.50"), PublicIPv6: a("2001:db8:ff::50"), IPv4: true, IPv6: true}, wantName: "eth0",
			wantIP: a("192.0.2.10"), wantIPv6: a("2001:db8:1::10"), wantPublic: a("203.0.113.50"), wantPub6: a("2001:db8:ff::50"),
		},
		{name: "public ipv6 ignored when ipv6 is not needed", opts: InterfaceOptions{PublicIPv6: a("2001:db8:ff::50")}, wantName: "eth0", wantIP: a("192.0.2.10"), wantPublic: a("192.0.2.10")},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ext, err := FindInterface(h, tc.opts)
			require.NoError(t, err)
			link, err := h.LinkByName(tc.wantName)
			require.NoError(t, err)
			assert.Equal(t, tc.wantName, ext.Name)
			assert.Equal(t, link.Attrs().Index, ext.Index)
			assert.Equal(t, link.Attrs().MTU, ext.MTU)
			assert.Equal(t, tc.wantIP, ext.IP, "IP")
			assert.Equal(t, tc.wantIPv6, ext.IPv6, "IPv6")
			assert.Equal(t, tc.wantPublic, ext.PublicIP, "PublicIP")
			assert.Equal(t, tc.wantPub6, ext.PublicIPv6, "PublicIPv6")
		})
	}
	ext, err := FindInterface(h, InterfaceOptions{})
	require.NoError(t, err)
	assert.Equal(t, 1400, ext.MTU, "MTU from the link")
}

func TestFindInterfaceFailures(t *testing.T) {
	h := ifaceLab(t)
	_, empty := newNS(t) // only lo: no default route
	tests := []struct {
		name    string
		h       *netlink.Handle
		opts    InterfaceOptions
		wantErr string
		noIface bool
	}{
		{
			name: "everything tried is listed", h: empty,
			opts:    InterfaceOptions{Names: []string{"eth9", "10.9.9.9"}, Regexes: []string{"^wlan", "^nomatch"}, CanReach: netip.MustParseAddr("192.0.2.99")},
			wantErr: `no external interface: name "eth9": not found; address 10.9.9.9: not on any interface; regex "^wlan": no match; regex "^nomatch": no match; can-reach 192.0.2.99: network is unreachable`,
			noIface: true,
		},
		{
			name: "missing family is named", h: h,
			opts:    InterfaceOptions{Names: []string{"ens5"}, Regexes: []string{"^ens5$", "^wlan0$"}, IPv6: true},
			wantErr: `no external interface: name "ens5": ens5 has no global ipv6 address; regex "^ens5$": ens5 has no global ipv6 address; regex "^wlan0$": no match`,
			noIface: true,
		},
		{
			name: "no default route", h: empty, opts: InterfaceOptions{IPv4: true, IPv6: true},
			wantErr: `no external interface: default route: none`, noIface: true,
		},
		{name: "bad regex", h: h, opts: InterfaceOptions{Regexes: []string{"("}}, wantErr: "interface regex \"(\": error parsing regexp: missing closing ): `(`"},
		{name: "public ip of the wrong family", h: h, opts: InterfaceOptions{PublicIP: netip.MustParseAddr("2001:db8::1")}, wantErr: "public ip 2001:db8::1 is not an IPv4 address"},
		{name: "public ipv6 of the wrong family", h: h, opts: InterfaceOptions{PublicIPv6: netip.MustParseAddr("192.0.2.1")}, wantErr: "public ipv6 192.0.2.1 is not an IPv6 address"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := FindInterface(tc.h, tc.opts)
			require.EqualError(t, err, tc.wantErr)
			assert.Equal(t, tc.noIface, errors.Is(err, ErrNoInterface))
		})
	}
}

func TestFindInterfaceDefaultRouteWithoutAddress(t *testing.T) {
	_, h := newNS(t)
	link := addVeth(t, h, "eth0", "2001:db8:1::10/64")
	// An on-link IPv4 default route on an interface with no IPv4 address.
	require.NoError(t, h.RouteAdd(&netlink.Route{LinkIndex: link.Attrs().Index, Scope: unix.RT_SCOPE_LINK, Family: netlink.FAMILY_V4, Dst: ipconv.IPNetFromPrefix(netip.MustParsePrefix("0.0.0.0/0"))}))
	_, err := FindInterface(h, InterfaceOptions{})
	require.EqualError(t, err, "no external interface: default route: ipv4 via eth0 has no global ipv4 address")
}
