package backend

import (
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

// Forwarders to internal/nlsafe and internal/ipconv for code not yet moved
// over (kept only until every dataplane calls those packages directly).

func InNamespace(ns netns.NsHandle, fn func() error) error { return nlsafe.InNamespace(ns, fn) }
func SetSysctl(ns netns.NsHandle, path, value string) error {
	return nlsafe.SetSysctl(ns, path, value)
}
func GetSysctl(ns netns.NsHandle, path string) (string, error) { return nlsafe.GetSysctl(ns, path) }
func IsCurrentNamespace(ns netns.NsHandle) bool                { return nlsafe.IsCurrentNamespace(ns) }
func SubscribeNamespace(ns netns.NsHandle) netns.NsHandle      { return nlsafe.SubscribeNamespace(ns) }

const SubscribeBuffer = nlsafe.SubscribeBuffer

func SubscribeLinks(ch chan netlink.LinkUpdate, done chan struct{}, ns netns.NsHandle, onErr func(error)) error {
	return nlsafe.SubscribeLinks(ch, done, ns, onErr)
}
func SubscribeNeighs(ch chan netlink.NeighUpdate, done chan struct{}, ns netns.NsHandle, onErr func(error)) error {
	return nlsafe.SubscribeNeighs(ch, done, ns, onErr)
}
func SubscribeRoutes(ch chan netlink.RouteUpdate, done chan struct{}, ns netns.NsHandle, onErr func(error)) error {
	return nlsafe.SubscribeRoutes(ch, done, ns, onErr)
}
func ListLinks(h *netlink.Handle) ([]netlink.Link, error) { return nlsafe.Wrap(h).LinkList() }
func ListAddrs(h *netlink.Handle, link netlink.Link, family int) ([]netlink.Addr, error) {
	return nlsafe.Wrap(h).AddrList(link, family)
}
func ListRoutes(h *netlink.Handle, family int, filter *netlink.Route, mask uint64) ([]netlink.Route, error) {
	return nlsafe.Wrap(h).RouteListFiltered(family, filter, mask)
}
func ListNeighs(h *netlink.Handle, linkIndex, family int) ([]netlink.Neigh, error) {
	return nlsafe.Wrap(h).NeighList(linkIndex, family)
}
func ListXfrmStates(h *netlink.Handle) ([]netlink.XfrmState, error) {
	return nlsafe.Wrap(h).XfrmStateList(netlink.FAMILY_ALL)
}
func ListXfrmPolicies(h *netlink.Handle) ([]netlink.XfrmPolicy, error) {
	return nlsafe.Wrap(h).XfrmPolicyList(netlink.FAMILY_ALL)
}
func PrefixFromIPNet(n *net.IPNet) (netip.Prefix, bool) { return ipconv.PrefixFromIPNet(n) }
func IPNetFromPrefix(p netip.Prefix) *net.IPNet         { return ipconv.IPNetFromPrefix(p) }
func IPFromAddr(a netip.Addr) net.IP                    { return ipconv.IPFromAddr(a) }
func AddrFromIP(ip net.IP) netip.Addr                   { return ipconv.AddrFromIP(ip) }
