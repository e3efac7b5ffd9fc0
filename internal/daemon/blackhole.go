package daemon

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/lease"
)

// blackholeMetric keeps the blackhole route behind the pod bridge's own
// route to the same subnet (metric 0, added by the kernel with the
// bridge's address): it only catches traffic when no bridge serves the
// subnet, instead of letting it leave through the default route.
const blackholeMetric = 4242

func blackholeRoute(p netip.Prefix) *netlink.Route {
	return &netlink.Route{
		Dst:      backend.IPNetFromPrefix(p.Masked()),
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
