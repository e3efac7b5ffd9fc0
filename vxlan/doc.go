// Package vxlan is the VXLAN dataplane, flannel's default: every node owns a
// VXLAN device (flannel.<VNI> over an IPv4 underlay, flannel-v6.<VNI> over
// IPv6) and reaches each peer's pod subnet through it with three kernel
// entries per peer and family: a permanent neighbour entry (peer subnet
// address → peer VTEP MAC), a permanent FDB entry (peer VTEP MAC → peer
// public IP) and an onlink route via the peer subnet address. With
// DirectRouting, a peer on the same L2 segment gets a plain route via its
// public IP on the external interface instead.
//
// The VTEP MAC is stable: it is reused from an existing device, and kept in
// memory (or pinned by Options.VtepMAC) when the device must be recreated,
// so that peers' FDB entries stay valid across agent restarts.
//
// Entries are reconciled level-triggered (missing added, wrong fixed, stale
// deleted) and written in batches through a raw netlink socket opened in the
// node's namespace, so that programming thousands of peers costs about what
// the kernel itself needs. Only entries on the flannel devices, and routes
// carrying backend.RouteProtocol on the external interface, are ever deleted.
//
// It does not allocate leases, write subnet.env or set up masquerading: the
// Agent does that around it.
package vxlan
