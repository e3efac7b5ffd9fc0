package ipip_test

import (
	"errors"
	"fmt"
	"net"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/backendtest"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/ipip"
)

// TestInVMContract runs the dataplane contract suite on IPv4 (ipip has no
// IPv6), through the tunnel and with DirectRouting (the lab's nodes share
// one segment, so every peer then gets a direct route on the external
// interface). Its damage: a peer's route deleted, the device set down, the
// device deleted.
func TestInVMContract(t *testing.T) {
	inVM(t)
	for _, direct := range []bool{false, true} {
		t.Run(map[bool]string{false: "tunnel", true: "direct routing"}[direct], func(t *testing.T) {
			backendtest.Run(t, backendtest.Fixture{
				Type: ipip.Type,
				IPv4: true,
				New: func(t *testing.T, repair time.Duration) flannel.Backend {
					return ipip.New(ipip.Options{DirectRouting: direct, RepairInterval: repair})
				},
				Dump:   dumpIPIP,
				Damage: ipipDamage,
			})
		})
	}
}

var ipipDamage = []backendtest.Damage{
	{Name: "route", Do: func(t *testing.T, n, peer *backendtest.Node) {
		r := netlink.Route{Dst: ipconv.IPNetFromPrefix(peer.Lease.Subnet), Protocol: backend.RouteProtocol}
		require.NoError(t, n.Node.Handle.RouteDel(&r), "delete route to %s", peer.Lease.Subnet)
	}},
	{Name: "device down", Do: func(t *testing.T, n, _ *backendtest.Node) {
		l, err := n.Node.Handle.LinkByName(ipip.DeviceName)
		require.NoError(t, err)
		require.NoError(t, n.Node.Handle.LinkSetDown(l))
	}},
	{Name: "device deleted", Do: func(t *testing.T, n, _ *backendtest.Node) {
		l, err := n.Node.Handle.LinkByName(ipip.DeviceName)
		require.NoError(t, err)
		require.NoError(t, n.Node.Handle.LinkDel(l))
	}},
}

// dumpIPIP renders flannel.ipip (type, local, remote, MTU, up, addresses)
// when it exists, and the routes of ours on every link.
func dumpIPIP(t *testing.T, n *backendtest.Node) []string {
	t.Helper()
	h := n.Node.Handle
	out := oursOn(t, h)
	l, err := h.LinkByName(ipip.DeviceName)
	if errors.As(err, &netlink.LinkNotFoundError{}) {
		return out
	}
	require.NoError(t, err)
	line := fmt.Sprintf("device %s type %s mtu %d up %t", ipip.DeviceName, l.Type(), l.Attrs().MTU, l.Attrs().Flags&net.FlagUp != 0)
	if tun, ok := l.(*netlink.Iptun); ok {
		line += fmt.Sprintf(" local %s remote %s", tun.Local, tun.Remote)
	}
	addrs, err := nlsafe.Wrap(h).AddrList(l, netlink.FAMILY_ALL)
	require.NoError(t, err)
	for _, a := range addrs {
		if p, ok := ipconv.PrefixFromIPNet(a.IPNet); ok && !p.Addr().IsLinkLocalUnicast() {
			line += " addr " + p.String()
		}
	}
	return append(out, line)
}
