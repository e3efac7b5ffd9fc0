package backend

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

// RouteProtocol is the route protocol number (rtm_protocol) that marks the
// routes this module owns. 101 is unassigned in iproute2's rt_protos and not
// used by bird, calico or cilium; `ip route show proto 101` lists ours.
// Reconcilers only ever delete routes carrying it.
const RouteProtocol netlink.RouteProtocol = 101

// ipv6DefaultMetric is the metric the kernel gives an IPv6 route added with
// metric 0 (IP6_RT_PRIO_USER).
const ipv6DefaultMetric = 1024

// RouteError is one route a RouteReconciler could not program or delete.
// Reconcile joins them (errors.Join) so callers can map each one back to
// the peer it was for.
type RouteError struct {
	// Op is "replace" or "delete".
	Op    string
	Route netlink.Route
	Err   error
}

func (e *RouteError) Error() string {
	op := e.Op
	if op == "" {
		op = "program"
	}
	return fmt.Sprintf("%s route %s: %v", op, FormatRoute(e.Route), e.Err)
}

func (e *RouteError) Unwrap() error { return e.Err }

// FormatRoute renders r the way `ip route` would, for logs and errors:
// "10.244.1.0/24 via 172.30.0.11 dev 3 proto 101".
func FormatRoute(r netlink.Route) string {
	s := "default"
	if r.Dst != nil {
		s = r.Dst.String()
	}
	if r.Gw != nil {
		s += " via " + r.Gw.String()
	}
	if r.LinkIndex != 0 {
		s += fmt.Sprintf(" dev %d", r.LinkIndex)
	}
	if r.Table != 0 && r.Table != unix.RT_TABLE_MAIN {
		s += fmt.Sprintf(" table %d", r.Table)
	}
	if r.Protocol != 0 {
		s += " proto " + r.Protocol.String()
	}
	return s
}

// routeKey identifies a route the way the reconciler does: by table and
// destination. Routes are one per destination in the tables we manage.
type routeKey struct {
	table int
	dst   netip.Prefix
}

func keyOf(r netlink.Route) routeKey {
	return routeKey{table: tableOf(r), dst: dstOf(r)}
}

func tableOf(r netlink.Route) int {
	if r.Table == 0 {
		return unix.RT_TABLE_MAIN
	}
	return r.Table
}

// dstOf converts the route's destination to a masked prefix; a nil Dst is
// the default route of the route's family (invalid when that is unknown).
func dstOf(r netlink.Route) netip.Prefix {
	if r.Dst == nil {
		switch r.Family {
		case netlink.FAMILY_V4:
			return netip.PrefixFrom(netip.IPv4Unspecified(), 0)
		case netlink.FAMILY_V6:
			return netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
		return netip.Prefix{}
	}
	p, ok := ipconv.PrefixFromIPNet(r.Dst)
	if !ok {
		return netip.Prefix{}
	}
	return p
}

func familyOf(r netlink.Route) int {
	if p := dstOf(r); p.IsValid() {
		if p.Addr().Is4() {
			return netlink.FAMILY_V4
		}
		return netlink.FAMILY_V6
	}
	return r.Family
}

// priorityOf is the metric the kernel reports for r.
func priorityOf(r netlink.Route) int {
	if r.Priority == 0 && familyOf(r) == netlink.FAMILY_V6 {
		return ipv6DefaultMetric
	}
	return r.Priority
}

func typeOf(r netlink.Route) int {
	if r.Type == 0 {
		return unix.RTN_UNICAST
	}
	return r.Type
}

// SameRoute reports whether actual, as the kernel lists it, already is the
// normalized desired route (RouteReconciler.Normalized): the comparison
// DiffRoutes makes for routes of one table and destination.
func SameRoute(desired, actual netlink.Route) bool { return sameRoute(desired, actual) }

// sameRoute reports whether actual already is what desired asks for. Only
// the attributes a reconciler sets are compared; the kernel fills others
// (IPv6 metric, cache info) that desired leaves zero.
func sameRoute(desired, actual netlink.Route) bool {
	if !desired.Gw.Equal(actual.Gw) || desired.LinkIndex != actual.LinkIndex {
		return false
	}
	if desired.Flags&unix.RTNH_F_ONLINK != actual.Flags&unix.RTNH_F_ONLINK {
		return false
	}
	if desired.MTU != actual.MTU || desired.Scope != actual.Scope || typeOf(desired) != typeOf(actual) {
		return false
	}
	if desired.Protocol != 0 && desired.Protocol != actual.Protocol {
		return false // an adopted route (RouteReconciler.Adopt) is re-marked as ours
	}
	if desired.Src != nil && !desired.Src.Equal(actual.Src) {
		return false
	}
	return priorityOf(desired) == priorityOf(actual)
}

// DiffRoutes computes what turns actual into desired. Routes are keyed by
// table and destination. add holds every desired route that is missing or
// differs (gateway, link, onlink flag, MTU, scope, type, source, metric) from
// the actual one; it is meant for RouteReplace. del holds every actual route
// whose key is not desired, duplicates of an actual key, and an actual route
// whose metric differs from its replacement (a replace with another metric
// adds a second route instead of overwriting). Duplicate desired keys
// collapse to the first. Order follows the inputs. It has no side effects.
func DiffRoutes(desired, actual []netlink.Route) (add, del []netlink.Route) {
	want := make(map[routeKey]netlink.Route, len(desired))
	var order []routeKey
	for _, r := range desired {
		k := keyOf(r)
		if _, dup := want[k]; dup {
			continue
		}
		want[k] = r
		order = append(order, k)
	}
	// The first actual route per key is the one compared; later ones with
	// the same key (another metric, a multipath leftover) are deleted.
	have := make(map[routeKey]netlink.Route, len(actual))
	for _, r := range actual {
		k := keyOf(r)
		if _, dup := have[k]; dup {
			del = append(del, r)
			continue
		}
		have[k] = r
		w, ok := want[k]
		switch {
		case !ok:
			del = append(del, r)
		case !sameRoute(w, r) && priorityOf(w) != priorityOf(r):
			del = append(del, r)
		}
	}
	for _, k := range order {
		w := want[k]
		if a, ok := have[k]; ok && sameRoute(w, a) {
			continue
		}
		add = append(add, w)
	}
	return add, del
}

// RouteReconciler makes the routes it owns on one link match a desired set.
// It owns the routes carrying its Protocol in its Table; others, even on the
// same link and for the same destination, are never deleted. The zero value
// is ready to use. It keeps no state between calls, so it is safe for
// concurrent use on different links.
type RouteReconciler struct {
	// Protocol marks owned routes. Optional: RouteProtocol when zero.
	Protocol netlink.RouteProtocol
	// Table is the routing table. Optional: the main table when zero.
	Table int
	// Logger receives a debug line per change. Optional: nil discards.
	Logger *slog.Logger
	// Adopt, when set, also owns routes in Table without Protocol that it
	// accepts: upstream flanneld's, which carry no mark (UpstreamRoute), so
	// that on a node migrated from upstream they are replaced by ours or,
	// for peers gone meanwhile, deleted. Optional.
	Adopt func(netlink.Route) bool
}

func (r *RouteReconciler) protocol() netlink.RouteProtocol {
	if r.Protocol == 0 {
		return RouteProtocol
	}
	return r.Protocol
}

func (r *RouteReconciler) table() int {
	if r.Table == 0 {
		return unix.RT_TABLE_MAIN
	}
	return r.Table
}

// normalize fills in what Reconcile sets on every desired route before it
// is compared and programmed: the link (when zero), the protocol, the table
// and the family.
func (r *RouteReconciler) normalize(linkIndex int, desired []netlink.Route) []netlink.Route {
	out := make([]netlink.Route, 0, len(desired))
	for _, d := range desired {
		out = append(out, r.Normalized(linkIndex, d))
	}
	return out
}

// Normalized is d as Reconcile compares and programs it: with linkIndex
// when d has no link, and the reconciler's protocol, table and d's family.
// A dataplane that diffs routes itself (backend.DiffRoutes) uses it to
// build desired routes that match what Owned lists.
func (r *RouteReconciler) Normalized(linkIndex int, d netlink.Route) netlink.Route {
	if d.LinkIndex == 0 {
		d.LinkIndex = linkIndex
	}
	d.Protocol = r.protocol()
	d.Table = r.table()
	d.Family = familyOf(d)
	return d
}

// Owned lists the routes this reconciler owns on linkIndex (on every link
// when zero), both families.
func (r *RouteReconciler) Owned(h *netlink.Handle, linkIndex int) ([]netlink.Route, error) {
	var out []netlink.Route
	err := r.OwnedEach(h, linkIndex, func() { out = out[:0] }, func(rt netlink.Route) { out = append(out, rt) })
	if err != nil {
		return nil, err
	}
	return out, nil
}

// OwnedEach is Owned without the list: it calls f with each owned route
// as the dump is read. begin, when not nil, is called before each attempt
// of the dump (an interrupted one is tried again): what f was shown
// before is then to be dropped.
func (r *RouteReconciler) OwnedEach(h *netlink.Handle, linkIndex int, begin func(), f func(netlink.Route)) error {
	filter := &netlink.Route{Protocol: r.protocol(), Table: r.table(), LinkIndex: linkIndex}
	mask := uint64(netlink.RT_FILTER_PROTOCOL | netlink.RT_FILTER_TABLE)
	if linkIndex != 0 {
		mask |= netlink.RT_FILTER_OIF
	}
	if r.Adopt == nil {
		return nlsafe.Wrap(h).RouteListFilteredEach(netlink.FAMILY_ALL, filter, mask, begin, f)
	}
	// Adopted routes carry no protocol of ours: list without it and keep
	// the routes that carry ours or that Adopt accepts.
	return nlsafe.Wrap(h).RouteListFilteredEach(netlink.FAMILY_ALL, filter, mask&^netlink.RT_FILTER_PROTOCOL, begin, func(rt netlink.Route) {
		if rt.Protocol == r.protocol() || r.Adopt(rt) {
			f(rt)
		}
	})
}

// Reconcile makes the owned routes on linkIndex equal desired: missing or
// different routes are replaced (RouteReplace), owned routes not desired are
// deleted (a route already gone counts as deleted). A route that fails does
// not stop the others; the returned error then joins one *RouteError per
// failed route (errors.As finds them). Listing failures and ctx
// cancellation are returned as such. Reconcile may be called repeatedly with
// the same routes; it changes nothing then.
func (r *RouteReconciler) Reconcile(ctx context.Context, h *netlink.Handle, linkIndex int, desired []netlink.Route) error {
	log := r.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	desired = r.normalize(linkIndex, desired)
	actual, err := r.Owned(h, linkIndex)
	if err != nil {
		return err
	}
	add, del := DiffRoutes(desired, actual)
	var errs []error
	// Make before break: replacements first, stale routes after.
	for _, rt := range add {
		if err := ctx.Err(); err != nil {
			return errors.Join(append(errs, err)...)
		}
		if err := h.RouteReplace(&rt); err != nil {
			errs = append(errs, &RouteError{Op: "replace", Route: rt, Err: err})
			continue
		}
		log.Debug("route replaced", "route", FormatRoute(rt))
	}
	for _, rt := range del {
		if err := ctx.Err(); err != nil {
			return errors.Join(append(errs, err)...)
		}
		if err := h.RouteDel(&rt); err != nil && !isGone(err) {
			errs = append(errs, &RouteError{Op: "delete", Route: rt, Err: err})
			continue
		}
		log.Debug("route deleted", "route", FormatRoute(rt))
	}
	return errors.Join(errs...)
}

// isGone reports whether a delete failed because the entry no longer exists.
func isGone(err error) bool {
	return errors.Is(err, syscall.ENOENT) || errors.Is(err, syscall.ESRCH)
}
