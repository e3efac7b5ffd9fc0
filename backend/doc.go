// Package backend holds the dataplane machinery that every backend (host-gw,
// vxlan, ipsec) shares: finding the node's external interface
// (FindInterface), a level-triggered route reconciler that only touches
// routes marked with RouteProtocol (DiffRoutes, RouteReconciler), the
// Apply/repair shell of every
// dataplane (Reconciler: one lock, the last peer set, nothing repaired
// before the first Apply, a repair loop over kernel watchers, peer errors
// warned once per lease change), and a Registry that maps net-conf.json
// backend types to constructors.
//
// It is not a backend itself and holds no state of its own: there is no
// global registry, no package-level handle, and every kernel operation goes
// through a *netlink.Handle (or namespace handle) that the caller passes in.
// The kernel access itself (dumps that retry interrupted dumps, namespace
// switches, sysctls, subscriptions) lives in internal/nlsafe and the netip
// conversions in internal/ipconv; golangci-lint (.golangci.yml) bans raw
// netlink calls everywhere else.
package backend
