package backend

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
)

// dumpAttempts is how often a netlink dump is tried before an
// ErrDumpInterrupted is returned. The kernel interrupts a dump when the table
// changes while it is read; a retry right away nearly always succeeds.
const dumpAttempts = 5

// retryDump calls fn until it returns something other than
// netlink.ErrDumpInterrupted, at most dumpAttempts times. The last error
// names what was dumped.
func retryDump[T any](what string, fn func() (T, error)) (T, error) {
	var (
		res T
		err error
	)
	for range dumpAttempts {
		res, err = fn()
		if err == nil {
			return res, nil
		}
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return res, fmt.Errorf("list %s: %w", what, err)
		}
	}
	var zero T
	return zero, fmt.Errorf("list %s: %d attempts: %w", what, dumpAttempts, err)
}

// ListLinks lists the links of h's namespace, retrying interrupted dumps.
func ListLinks(h *netlink.Handle) ([]netlink.Link, error) {
	return retryDump("links", h.LinkList)
}

// ListAddrs lists the addresses of link (all links when nil) of the given
// family (netlink.FAMILY_ALL, FAMILY_V4, FAMILY_V6), retrying interrupted
// dumps.
func ListAddrs(h *netlink.Handle, link netlink.Link, family int) ([]netlink.Addr, error) {
	what := "addresses"
	if link != nil {
		what = "addresses of " + link.Attrs().Name
	}
	return retryDump(what, func() ([]netlink.Addr, error) { return h.AddrList(link, family) })
}

// ListRoutes lists routes matching filter and filterMask (netlink.RT_FILTER_*
// bits, as for netlink.RouteListFiltered), retrying interrupted dumps. Only
// the main table is listed unless the mask includes RT_FILTER_TABLE.
func ListRoutes(h *netlink.Handle, family int, filter *netlink.Route, filterMask uint64) ([]netlink.Route, error) {
	return retryDump("routes", func() ([]netlink.Route, error) {
		// A copy, since RouteListFiltered writes to its filter (and
		// dereferences a nil one).
		var f netlink.Route
		if filter != nil {
			f = *filter
		}
		return h.RouteListFiltered(family, &f, filterMask)
	})
}

// ListNeighs lists the neighbour entries of linkIndex (all links when 0) of
// the given family, retrying interrupted dumps.
func ListNeighs(h *netlink.Handle, linkIndex, family int) ([]netlink.Neigh, error) {
	return retryDump("neighbours", func() ([]netlink.Neigh, error) { return h.NeighList(linkIndex, family) })
}

// ListXfrmStates lists the XFRM states of h's namespace (both families),
// retrying interrupted dumps.
func ListXfrmStates(h *netlink.Handle) ([]netlink.XfrmState, error) {
	return retryDump("xfrm states", func() ([]netlink.XfrmState, error) { return h.XfrmStateList(netlink.FAMILY_ALL) })
}

// ListXfrmPolicies lists the XFRM policies of h's namespace (both
// families), retrying interrupted dumps.
func ListXfrmPolicies(h *netlink.Handle) ([]netlink.XfrmPolicy, error) {
	return retryDump("xfrm policies", func() ([]netlink.XfrmPolicy, error) { return h.XfrmPolicyList(netlink.FAMILY_ALL) })
}
