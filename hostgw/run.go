package hostgw

import (
	"context"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

// Run repairs drift until ctx ends: it re-applies the last peer set every
// RepairInterval and right after one of our routes on the external
// interface is deleted (a route netlink subscription in env.NS; without an
// open NS only the periodic repair runs). Nothing is repaired before the
// first Apply, so routes of a previous run stay until the caller has said
// which peers exist. Repair failures are logged and retried at the next
// tick (a peer that cannot be programmed once per change of its lease); a failing subscription is retried with capped backoff. Run joins
// all its goroutines and returns nil when ctx ends.
func (n *Network) Run(ctx context.Context) error {
	var watchers []backend.Watcher
	if n.env.NS.IsOpen() {
		watchers = append(watchers, backend.NetlinkWatcher(n.log, n.env.NS, "route", nlsafe.SubscribeRouteDeletes, func(u netlink.RouteUpdate) bool {
			return u.Type == unix.RTM_DELROUTE && u.Route.Protocol == backend.RouteProtocol && u.Route.LinkIndex == n.env.Iface.Index
		}))
	} else {
		n.log.Info("no namespace handle: repairing on a timer only", "interval", n.interval)
	}
	n.r.Run(ctx, watchers...)
	return nil
}
