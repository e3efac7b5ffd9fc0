// Package ipconv converts between net/netip values, which the module uses
// everywhere, and the net.IP and *net.IPNet values that vishvananda/netlink
// takes and returns; conversions happen only at the netlink call. IPv4 is
// always unmapped and prefixes are always masked. It has no side effects
// and no state.
package ipconv

import (
	"net"
	"net/netip"
)

// PrefixFromIPNet converts n to a masked netip.Prefix (IPv4 unmapped, also
// for an IPv4 address with a 128-bit mask). ok is false when n is nil or
// malformed.
func PrefixFromIPNet(n *net.IPNet) (netip.Prefix, bool) {
	if n == nil {
		return netip.Prefix{}, false
	}
	a, ok := netip.AddrFromSlice(n.IP)
	if !ok {
		return netip.Prefix{}, false
	}
	ones, bits := n.Mask.Size()
	if bits == 0 {
		return netip.Prefix{}, false
	}
	a = a.Unmap()
	if a.Is4() && bits == 128 {
		ones -= 96
	}
	if ones < 0 || ones > a.BitLen() {
		return netip.Prefix{}, false
	}
	return netip.PrefixFrom(a, ones).Masked(), true
}

// IPNetFromPrefix converts p, masked, to the *net.IPNet that netlink calls
// take (4-byte IP and mask for IPv4).
func IPNetFromPrefix(p netip.Prefix) *net.IPNet {
	p = p.Masked()
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

// IPFromAddr converts a to the net.IP that netlink calls take (4 bytes for
// IPv4); nil when a is invalid.
func IPFromAddr(a netip.Addr) net.IP {
	if !a.IsValid() {
		return nil
	}
	return net.IP(a.Unmap().AsSlice())
}

// AddrFromIP converts ip to a netip.Addr (IPv4 unmapped); invalid when ip is
// nil or malformed.
func AddrFromIP(ip net.IP) netip.Addr {
	a, ok := netip.AddrFromSlice(ip)
	if !ok {
		return netip.Addr{}
	}
	return a.Unmap()
}
