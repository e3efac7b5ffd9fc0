package netlab

import (
	"fmt"
	"net"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// SegmentPrefix returns the IPv4 underlay prefix of segment s,
// 172.30.<s>.0/24.
func SegmentPrefix(s int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{172, 30, byte(s), 0}), 24)
}

// SegmentPrefix6 returns the IPv6 underlay prefix of segment s,
// fd00:172:30:<s>::/64 (s written in decimal digits, as in the IPv4 form).
func SegmentPrefix6(s int) netip.Prefix {
	return netip.MustParsePrefix(fmt.Sprintf("fd00:172:30:%d::/64", s))
}

// RouterIP and RouterIPv6 return the router's address on segment s (.1, ::1),
// every node's default gateway there.
func RouterIP(s int) netip.Addr   { return SegmentPrefix(s).Addr().Next() }
func RouterIPv6(s int) netip.Addr { return SegmentPrefix6(s).Addr().Next() }

// nodeAddrs returns node i's underlay addresses (.10+i and ::a+i).
func nodeAddrs(i, segments int) (v4, v6 netip.Addr) {
	s := i % segments
	b4 := SegmentPrefix(s).Addr().As4()
	b4[3] = byte(10 + i)
	b6 := SegmentPrefix6(s).Addr().As16()
	b6[15] = byte(0xa + i)
	return netip.AddrFrom4(b4), netip.AddrFrom16(b6)
}

// commonSysctls apply to every namespace that routes or hosts addresses:
// IPv6 addresses must be usable at once (no DAD), and reverse-path filtering
// must not drop asymmetric test traffic.
func commonSysctls() []sysctl {
	return []sysctl{
		{path: "net/ipv4/conf/all/rp_filter", value: "0"},
		{path: "net/ipv4/conf/default/rp_filter", value: "0"},
		{path: "net/ipv6/conf/all/accept_dad", value: "0", optional: true},
		{path: "net/ipv6/conf/default/accept_dad", value: "0", optional: true},
	}
}

func forwardingSysctls() []sysctl {
	return append(commonSysctls(),
		sysctl{path: "net/ipv4/ip_forward", value: "1"},
		sysctl{path: "net/ipv6/conf/all/forwarding", value: "1", optional: true},
	)
}

func (l *Lab) routerSysctls() []sysctl { return forwardingSysctls() }

// addSegment creates segment s: a namespace with bridge br0, and a veth from
// the router ("eth<s>" there, holding .1 and ::1) to the bridge.
func (l *Lab) addSegment(s int) (*ownedNS, error) {
	seg, err := l.addNS(fmt.Sprintf("s%d", s), nil)
	if err != nil {
		return nil, err
	}
	snoop := false
	br := &netlink.Bridge{
		LinkAttrs:         netlink.LinkAttrs{Name: segmentBridge},
		MulticastSnooping: &snoop,
	}
	if err := seg.h.LinkAdd(br); err != nil {
		return nil, fmt.Errorf("add bridge %s in %s: %w", segmentBridge, seg.name, err)
	}
	if err := seg.h.LinkSetUp(br); err != nil {
		return nil, fmt.Errorf("set bridge %s up in %s: %w", segmentBridge, seg.name, err)
	}
	rtIface := fmt.Sprintf("eth%d", s)
	link, err := l.attach(l.router, l.NSName("rt"), rtIface, seg, "rt")
	if err != nil {
		return nil, err
	}
	if err := l.configure(l.router, l.NSName("rt"), link, RouterIP(s), RouterIPv6(s), netip.Addr{}, netip.Addr{}); err != nil {
		return nil, err
	}
	return seg, nil
}

// attach creates a veth named local in the namespace of h whose peer, named
// port, is enslaved to the segment's bridge, and brings both ends up.
func (l *Lab) attach(h *netlink.Handle, nsName, local string, seg *ownedNS, port string) (netlink.Link, error) {
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: local, MTU: l.opts.MTU},
		PeerName:      port,
		PeerMTU:       uint32(l.opts.MTU),
		PeerNamespace: netlink.NsFd(seg.ns),
	}
	if err := h.LinkAdd(veth); err != nil {
		return nil, fmt.Errorf("add veth %s in %s (peer %s in %s): %w", local, nsName, port, seg.name, err)
	}
	peer, err := seg.h.LinkByName(port)
	if err != nil {
		return nil, fmt.Errorf("find veth %s in %s: %w", port, seg.name, err)
	}
	br, err := seg.h.LinkByName(segmentBridge)
	if err != nil {
		return nil, fmt.Errorf("find bridge %s in %s: %w", segmentBridge, seg.name, err)
	}
	if err := seg.h.LinkSetMaster(peer, br); err != nil {
		return nil, fmt.Errorf("attach %s to %s in %s: %w", port, segmentBridge, seg.name, err)
	}
	if err := seg.h.LinkSetUp(peer); err != nil {
		return nil, fmt.Errorf("set %s up in %s: %w", port, seg.name, err)
	}
	link, err := h.LinkByName(local)
	if err != nil {
		return nil, fmt.Errorf("find veth %s in %s: %w", local, nsName, err)
	}
	if err := h.LinkSetUp(link); err != nil {
		return nil, fmt.Errorf("set %s up in %s: %w", local, nsName, err)
	}
	return link, nil
}

// configure adds the enabled families' underlay addresses (/24, /64) to link
// and, when gw/gw6 are valid, default routes via them.
func (l *Lab) configure(h *netlink.Handle, nsName string, link netlink.Link, ip, ip6, gw, gw6 netip.Addr) error {
	type fam struct {
		on     bool
		addr   netip.Addr
		bits   int
		gw     netip.Addr
		anyDst netip.Prefix
	}
	for _, f := range []fam{
		{l.opts.IPv4, ip, 24, gw, netip.PrefixFrom(netip.IPv4Unspecified(), 0)},
		{l.opts.IPv6, ip6, 64, gw6, netip.PrefixFrom(netip.IPv6Unspecified(), 0)},
	} {
		if !f.on {
			continue
		}
		p := netip.PrefixFrom(f.addr, f.bits)
		if err := addAddr(h, link, p); err != nil {
			return fmt.Errorf("%s in %s: %w", link.Attrs().Name, nsName, err)
		}
		if f.gw.IsValid() {
			if err := addDefaultRoute(h, link, f.gw); err != nil {
				return fmt.Errorf("%s in %s: %w", link.Attrs().Name, nsName, err)
			}
		}
	}
	return nil
}

// addAddr adds p to link; IPv6 addresses skip duplicate address detection
// so they are usable at once.
func addAddr(h *netlink.Handle, link netlink.Link, p netip.Prefix) error {
	a := &netlink.Addr{IPNet: prefixIPNet(p)}
	if p.Addr().Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	if err := h.AddrAdd(link, a); err != nil {
		return fmt.Errorf("add address %s: %w", p, err)
	}
	return nil
}

// addDefaultRoute adds a default route via gw over link.
func addDefaultRoute(h *netlink.Handle, link netlink.Link, gw netip.Addr) error {
	dst := netip.PrefixFrom(netip.IPv4Unspecified(), 0)
	if gw.Is6() {
		dst = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
	}
	r := &netlink.Route{
		LinkIndex: link.Attrs().Index,
		Dst:       prefixIPNet(dst),
		Gw:        net.IP(gw.AsSlice()),
	}
	if err := h.RouteAdd(r); err != nil {
		return fmt.Errorf("add default route via %s: %w", gw, err)
	}
	return nil
}

// prefixIPNet converts p (address bits kept) for netlink.
func prefixIPNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
