package backend

import (
	"net"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/internal/testenv"
)

// newNS creates a throwaway (unnamed) network namespace with lo up and
// returns it with a handle bound to it; both are closed at cleanup, which
// destroys the namespace and everything in it. The test's own thread never
// changes namespace (nlsafe.NewNamespace).
func newNS(t *testing.T) (netns.NsHandle, *netlink.Handle) {
	t.Helper()
	testenv.RequireRoot(t)
	ns, err := nlsafe.NewNamespace()
	require.NoError(t, err, "new namespace")
	t.Cleanup(func() { ns.Close() })
	h, err := netlink.NewHandleAt(ns)
	require.NoError(t, err)
	t.Cleanup(h.Close)
	lo, err := h.LinkByName("lo")
	require.NoError(t, err)
	require.NoError(t, h.LinkSetUp(lo))
	return ns, h
}

// addVeth creates a veth pair name<->name+"p" inside h's namespace, both
// up, with addrs (CIDR strings) on name, and returns name's link.
func addVeth(t *testing.T, h *netlink.Handle, name string, addrs ...string) netlink.Link {
	t.Helper()
	require.NoError(t, h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}))
	link, err := h.LinkByName(name)
	require.NoError(t, err)
	peer, err := h.LinkByName(name + "p")
	require.NoError(t, err)
	for _, a := range addrs {
		p := netip.MustParsePrefix(a)
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: ipconv.IPFromAddr(p.Addr()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
		if p.Addr().Is6() {
			addr.Flags = unix.IFA_F_NODAD // usable at once
		}
		require.NoError(t, h.AddrAdd(link, addr), "add %s to %s", a, name)
	}
	require.NoError(t, h.LinkSetUp(peer))
	require.NoError(t, h.LinkSetUp(link))
	link, err = h.LinkByName(name)
	require.NoError(t, err)
	return link
}
