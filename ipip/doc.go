// Package ipip is upstream flannel's ipip dataplane: pod traffic to another
// node is wrapped in an outer IPv4 header (IP protocol 4, 20 bytes, the
// cheapest encapsulation on a routed underlay) by one device, flannel.ipip,
// in ipip mode with local = the node's underlay address and no remote. Each
// peer gets a route "subnet via <public ip> dev flannel.ipip onlink": the
// gateway is the outer destination. With DirectRouting, a peer whose public
// IP is on the external interface's own segment gets a plain route via it
// on that interface instead, as host-gw does, and only peers behind a
// router pay for the tunnel.
//
// The device holds the lease's network address as /32 (the source for
// traffic from the node to pods elsewhere) and has the external MTU − 20.
// IPv4 only, as upstream: an IPv6 network is a configuration error. The
// kernel needs the ipip module (modprobe ipip); without it Prepare fails
// with an error that says so.
//
// Reconcile is level-triggered: Apply makes the routes of ours on the
// device and on the external interface match the peer set (stale ones
// deleted), and Run recreates a deleted device and replays every route.
// It only deletes what it owns: its device, and routes marked with
// backend.RouteProtocol.
package ipip
