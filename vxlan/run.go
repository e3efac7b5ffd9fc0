package vxlan

import (
	"context"
	"net"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

// Run repairs drift until ctx ends: it re-applies the last peer set every
// RepairInterval (only every ResyncInterval while the kernel is in sync and
// the subscriptions below are open), and right away when a flannel device is deleted or set
// down (recreating it with its MAC and replaying every peer) or when a
// permanent neighbour or FDB entry on a flannel device, or a route of ours,
// is deleted (netlink subscriptions in env.NS; without an open NS only the
// periodic repair runs; entries added by others only go at the periodic
// repair). Nothing is repaired before the first Apply, so
// entries of a previous run stay until the caller has said which peers
// exist. Repair failures are logged (a peer that cannot be programmed once
// per change of its lease) and retried; a failing subscription is
// retried with capped backoff and is never fatal. Run joins all its
// goroutines and returns nil when ctx ends.
func (n *Network) Run(ctx context.Context) error {
	var watchers []backend.Watcher
	if n.env.NS.IsOpen() {
		names := map[string]bool{}
		for _, d := range n.devs {
			names[d.spec.name] = true
		}
		watchers = append(watchers,
			backend.NetlinkHealthWatcher(n.log, n.env.NS, "link", nlsafe.SubscribeLinks, func(u netlink.LinkUpdate) bool {
				return u.Link != nil && names[u.Link.Attrs().Name] &&
					(u.Header.Type == unix.RTM_DELLINK || u.Link.Attrs().Flags&net.FlagUp == 0)
			}, n.watchUp[0].Store),
			backend.NetlinkHealthWatcher(n.log, n.env.NS, "neighbour", nlsafe.SubscribeNeighDeletes, func(u netlink.NeighUpdate) bool {
				// A deleted neighbour is reported NUD_FAILED, whatever it was.
				return u.Type == unix.RTM_DELNEIGH && n.ours(u.LinkIndex, false)
			}, n.watchUp[1].Store),
			backend.NetlinkHealthWatcher(n.log, n.env.NS, "route", nlsafe.SubscribeRouteDeletes, func(u netlink.RouteUpdate) bool {
				return u.Type == unix.RTM_DELROUTE && u.Protocol == backend.RouteProtocol && n.ours(u.LinkIndex, true)
			}, n.watchUp[2].Store))
	} else {
		n.log.Info("no namespace handle: repairing on a timer only", "interval", n.opts.RepairInterval)
	}
	n.r.Run(ctx, watchers...)
	return nil
}

// ours reports whether link is a flannel device (or, with ext, the
// external interface, where direct routes live). Device indexes change
// when a device is recreated, hence the lock.
func (n *Network) ours(link int, ext bool) bool {
	if ext && link == n.env.Iface.Index {
		return true
	}
	n.devMu.Lock()
	defer n.devMu.Unlock()
	for _, i := range n.devIndex {
		if i == link {
			return true
		}
	}
	return false
}
