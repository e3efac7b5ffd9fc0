package backendtest

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

// linkLocal is where the kernel's own IPv6 addresses and routes live; they
// come and go with DAD and link state, so snapshots leave them out.
var linkLocal = netip.MustParsePrefix("fe80::/10")

// Snapshot renders the node's kernel state, sorted: every link (name,
// index, type, MAC, MTU, up, master), every address but link-local ones,
// every route of the main table but link-local ones, every permanent
// neighbour, and every permanent FDB entry with a destination. Two equal snapshots mean no entry changed, not
// even by a delete and re-add of a device.
func Snapshot(t *testing.T, n *Node) []string {
	t.Helper()
	h := n.Node.Handle
	links, err := nlsafe.Wrap(h).LinkList()
	require.NoError(t, err)
	var out []string
	for _, l := range links {
		a := l.Attrs()
		out = append(out, fmt.Sprintf("link %s index %d type %s mac %s mtu %d up %t master %d",
			a.Name, a.Index, l.Type(), a.HardwareAddr, a.MTU, a.Flags&net.FlagUp != 0, a.MasterIndex))
		addrs, err := nlsafe.Wrap(h).AddrList(l, netlink.FAMILY_ALL)
		require.NoError(t, err)
		for _, ad := range addrs {
			if p, ok := ipconv.PrefixFromIPNet(ad.IPNet); ok && !linkLocal.Contains(p.Addr()) {
				out = append(out, fmt.Sprintf("addr %s %s", a.Name, p))
			}
		}
		for _, fam := range []int{unix.AF_INET, unix.AF_INET6, unix.AF_BRIDGE} {
			ns, err := nlsafe.Wrap(h).NeighList(a.Index, fam)
			require.NoError(t, err)
			for _, e := range ns {
				// A bridge FDB entry without a destination is the kernel's
				// (local and multicast MACs, added as addresses come up).
				if e.State&netlink.NUD_PERMANENT != 0 && (fam != unix.AF_BRIDGE || e.IP != nil) {
					out = append(out, fmt.Sprintf("neigh %s family %d %s %s", a.Name, fam, e.IP, e.HardwareAddr))
				}
			}
		}
	}
	rs, err := nlsafe.Wrap(h).RouteListFiltered(netlink.FAMILY_ALL, nil, 0)
	require.NoError(t, err)
	for _, r := range rs {
		if p, ok := ipconv.PrefixFromIPNet(r.Dst); ok && linkLocal.Contains(p.Addr()) {
			continue
		}
		out = append(out, fmt.Sprintf("route %s metric %d", backend.FormatRoute(r), r.Priority))
	}
	slices.Sort(out)
	return out
}
