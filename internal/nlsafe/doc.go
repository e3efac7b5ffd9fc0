// Package nlsafe is the module's one door to the kernel's networking
// state: a netlink handle bound to a network namespace (Handle) whose dump
// calls retry interrupted dumps, netlink subscriptions opened in a given
// namespace with a large receive buffer (SubscribeLinks, SubscribeRoutes,
// SubscribeXfrm, and SubscribeNeighDeletes and SubscribeRouteDeletes, which
// drop every other notification unread), and running code on a locked thread
// inside a namespace for what has no handle (InNamespace, SetSysctl,
// GetSysctl), and creating a namespace without moving the caller's thread
// (NewNamespace).
//
// The kernel marks a dump NLM_F_DUMP_INTR when the table changes while it is
// read; vishvananda/netlink then returns netlink.ErrDumpInterrupted with
// results that may be incomplete. A level-triggered reconciler that trusted
// them would delete or re-add entries that are fine, so every list call here
// is tried again (a retry right away nearly always succeeds), and after
// DumpAttempts interrupted tries the error is returned, never the partial
// result.
//
// The lint configuration (.golangci.yml, forbidigo) bans netlink's
// package-level calls, which act on the namespace of the calling thread,
// and the unwrapped dump methods of *netlink.Handle everywhere but here, so
// "every kernel operation goes through a handle bound to a namespace" is a
// check that fails. It is not a general netlink library: it wraps exactly
// what the module calls, and holds no state of its own.
package nlsafe
