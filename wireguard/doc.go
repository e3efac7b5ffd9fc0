// Package wireguard is the wireguard dataplane: pod traffic between nodes
// is encrypted by the kernel's WireGuard, wire-compatible with upstream
// flannel's wireguard backend, so nodes of this library and upstream
// flanneld can share one network.
//
// Each node has a WireGuard private key, kept in a key file
// (Options.KeyFile, upstream's format: base64, no newline) so that a
// restart keeps the public key and peers need no update. It publishes the
// public key and the UDP port with its lease, in BackendData for IPv4 and
// BackendV6Data for IPv6, as upstream does: {"PublicKey":"<base64>","Port":51820}.
//
// # Devices
//
// In ModeSeparate (the default) flannel-wg carries IPv4 pod traffic
// between the nodes' IPv4 addresses (UDP port ListenPort, 51820) and
// flannel-wg-v6 IPv6 traffic between their IPv6 addresses (ListenPortV6,
// 51821). In ModeAuto, ModeIPv4 and ModeIPv6 one device, flannel-wg,
// carries both families; the endpoint of each peer is of the mode's
// family, or in ModeAuto IPv4 unless only IPv6 can work (upstream's
// choice). In those modes this package publishes ListenPort in
// BackendV6Data, the port the device listens on, where upstream publishes
// ListenPortV6; when reading, it takes a peer's port from its BackendData
// when there is one, so both kinds of node reach each other.
//
// A device gets the lease's subnet address (10.244.3.0/32,
// fd00:10:244:3::/128) and a route for the cluster network through it
// (route protocol backend.RouteProtocol), and one WireGuard peer per
// other node: its public key, an endpoint at its public address and
// port, its subnet(s) as AllowedIPs, and the configured keepalive and
// PSK. Peers are level-triggered: Apply adds what is missing, updates a
// changed key or endpoint in place and removes peers nobody published.
// The devices' MTU is the underlay MTU minus 60 over IPv4 and 80 over
// IPv6.
//
// Devices go through a namespace-bound netlink handle, peers through
// wgctrl, whose sockets are opened on a thread inside the node's
// namespace (Env.NS is required). A kernel without WireGuard fails Prepare
// with ErrNoWireGuard; there is no fallback.
//
// It does not run a userspace WireGuard, rotate keys, or set up
// masquerading.
package wireguard
