package lease

import "net/netip"

// Identity returns the address that identifies the node publishing a in a
// network with c, as the etcd and memory stores reclaim leases (and as
// upstream flannel matches them): PublicIP when IPv4 is enabled, else
// PublicIPv6. It is invalid when that address is missing. The Kubernetes
// store identifies a node by its Node name instead.
func (c Config) Identity(a Attrs) netip.Addr {
	if c.EnableIPv4 {
		return a.PublicIP
	}
	return a.PublicIPv6
}

// Identity returns the address that identifies the node holding l, by the
// rule of Config.Identity: PublicIP when l has an IPv4 subnet (IPv4 is
// enabled), else PublicIPv6.
func (l Lease) Identity() netip.Addr {
	if l.Subnet.IsValid() {
		return l.Attrs.PublicIP
	}
	return l.Attrs.PublicIPv6
}

// SameNode reports whether a and b were published by the same node in a
// network with c: both carry the same valid identifying address.
func (c Config) SameNode(a, b Attrs) bool {
	id := c.Identity(a)
	return id.IsValid() && id == c.Identity(b)
}
