package backend

import (
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/lease"
)

// UpstreamRoute returns a RouteReconciler.Adopt that accepts the routes
// upstream flanneld's host-gw (and vxlan DirectRouting) writes on the
// external interface: a unicast route in the main table with the kernel's
// default mark (boot: upstream sets no protocol), via a gateway, to a
// subnet of exactly the lease length inside the cluster network of its
// family, other than the node's own. Anything else (another protocol, a
// route of another length, outside the network, without a gateway) is
// never adopted.
func UpstreamRoute(cfg lease.Config, own lease.Lease) func(netlink.Route) bool {
	return func(r netlink.Route) bool {
		if r.Protocol != unix.RTPROT_BOOT || r.Type != unix.RTN_UNICAST || r.Gw == nil || len(r.MultiPath) > 0 {
			return false
		}
		p, ok := ipconv.PrefixFromIPNet(r.Dst)
		if !ok {
			return false
		}
		fits := func(on bool, network netip.Prefix, bits int, ownSubnet netip.Prefix) bool {
			return on && p.Bits() == bits && network.Contains(p.Addr()) && p != ownSubnet
		}
		if p.Addr().Is4() {
			return fits(cfg.EnableIPv4, cfg.Network, cfg.SubnetLen, own.Subnet)
		}
		return fits(cfg.EnableIPv6, cfg.IPv6Network, cfg.IPv6SubnetLen, own.IPv6Subnet)
	}
}
