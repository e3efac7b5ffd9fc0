// Package hostgw is the host-gw dataplane: every peer node's pod subnet is
// reached by a plain kernel route via that node's public IP on the external
// interface ("10.244.1.0/24 via 172.30.0.11 dev eth0 proto 101"), for IPv4,
// IPv6 and dual-stack. No encapsulation, no devices: the nodes must share one
// L2 segment, and a peer whose public IP is not directly reachable on the
// external interface is reported as a *flannel.PeerError.
//
// It is not an overlay and does not allocate leases, write subnet.env or
// set up masquerading: the Agent does that around it. It only deletes routes
// carrying backend.RouteProtocol on the external interface.
package hostgw
