package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/lease"
)

// blackholeMetric keeps the blackhole route behind the pod bridge's own
// route to the same subnet (metric 0, added by the kernel with the
// bridge's address): it only catches traffic when no bridge serves the
// subnet, instead of letting it leave through the default route.
const blackholeMetric = 4242

func blackholeRoute(p netip.Prefix) *netlink.Route {
	return &netlink.Route{
		Dst:      ipconv.IPNetFromPrefix(p.Masked()),
		Type:     unix.RTN_BLACKHOLE,
		Protocol: unix.RTPROT_STATIC,
		Priority: blackholeMetric,
		Table:    unix.RT_TABLE_MAIN,
	}
}

func subnetsOf(l lease.Lease) []netip.Prefix {
	var out []netip.Prefix
	for _, p := range []netip.Prefix{l.Subnet, l.IPv6Subnet} {
		if p.IsValid() {
			out = append(out, p)
		}
	}
	return out
}

// addBlackholes adds (or replaces) a blackhole route for each of the
// lease's subnets (upstream --ip-blackhole-route). Safe to call again.
func addBlackholes(h *netlink.Handle, l lease.Lease) error {
	var errs []error
	for _, p := range subnetsOf(l) {
		if err := h.RouteReplace(blackholeRoute(p)); err != nil {
			errs = append(errs, fmt.Errorf("add blackhole route %s: %w", p, err))
		}
	}
	return errors.Join(errs...)
}

// delBlackholes removes the blackhole routes addBlackholes added; absent
// ones are fine.
func delBlackholes(h *netlink.Handle, l lease.Lease) error {
	var errs []error
	for _, p := range subnetsOf(l) {
		err := h.RouteDel(blackholeRoute(p))
		if err != nil && !errors.Is(err, unix.ESRCH) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("delete blackhole route %s: %w", p, err))
		}
	}
	return errors.Join(errs...)
}

// blackholes keeps the node's blackhole routes (--ip-blackhole-route) in
// place, level-triggered: added once the agent is ready, re-added at once
// when one is deleted (a route subscription) and checked every interval,
// as upstream re-adds it on every resync.
type blackholes struct {
	h        *netlink.Handle
	ns       netns.NsHandle
	interval time.Duration
	log      *slog.Logger

	mu  sync.Mutex
	own lease.Lease // zero until the agent is ready
}

// ready is the Agent's OnReady: the lease is known, add the routes.
func (b *blackholes) ready(st flannel.State) {
	b.mu.Lock()
	b.own = st.Lease
	b.mu.Unlock()
	b.repair(context.Background(), "ready")
}

func (b *blackholes) repair(_ context.Context, why string) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(subnetsOf(b.own)) == 0 {
		return
	}
	if err := addBlackholes(b.h, b.own); err != nil {
		b.log.Warn("blackhole route not added", "trigger", why, "error", err)
	}
}

// start runs the repair loop until ctx ends or stop is called; stop waits
// for it.
func (b *blackholes) start(ctx context.Context) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	deleted := backend.NetlinkWatcher(b.log, b.ns, "route", nlsafe.SubscribeRouteDeletes, func(u netlink.RouteUpdate) bool {
		return u.Type == unix.RTM_DELROUTE && u.Route.Type == unix.RTN_BLACKHOLE
	})
	go func() {
		defer close(done)
		backend.RepairLoop(ctx, b.interval, b.repair, deleted)
	}()
	return func() { cancel(); <-done }
}
