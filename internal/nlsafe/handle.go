package nlsafe

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netlink/nl"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// DumpAttempts is how often a netlink dump is tried before
// netlink.ErrDumpInterrupted is returned.
const DumpAttempts = 5

// Handle is a *netlink.Handle together with the network namespace it is
// bound to. Every method of the embedded handle that is not a dump (link,
// address, route, neighbour and XFRM writes, LinkByIndex, RouteGet, ...) is
// used as is; the dump methods below shadow the embedded ones and retry
// interrupted dumps. A Handle does not own what it wraps: closing the
// netlink handle and the namespace stays with whoever opened them. It is a
// small value, safe to copy, and as safe for concurrent use as the
// *netlink.Handle it wraps.
type Handle struct {
	*netlink.Handle

	ns    netns.NsHandle
	hasNS bool
	// interrupted, when set (by tests only), is asked after every dump
	// attempt; true turns the attempt's result into an interrupted dump, as
	// the kernel's NLM_F_DUMP_INTR does.
	interrupted func(what string) bool
}

// New wraps h, which must be bound to ns (netlink.NewHandleAt(ns)). The
// namespace is what subscriptions and Do use.
func New(h *netlink.Handle, ns netns.NsHandle) Handle {
	return Handle{Handle: h, ns: ns, hasNS: true}
}

// Wrap wraps h without its namespace, for code that only reads and writes
// through the handle (dumps, route and link calls). NS then reports
// netns.None() and Do fails.
func Wrap(h *netlink.Handle) Handle {
	return Handle{Handle: h, ns: netns.None()}
}

// NS returns the namespace the handle was bound to by New, else
// netns.None().
func (h Handle) NS() netns.NsHandle {
	if !h.hasNS {
		return netns.None()
	}
	return h.ns
}

// Do runs fn on a locked thread inside the handle's namespace (see
// InNamespace). It fails without running fn when the Handle came from Wrap.
func (h Handle) Do(fn func() error) error {
	return InNamespace(h.NS(), fn)
}

// retry calls fn until it returns something other than
// netlink.ErrDumpInterrupted, at most DumpAttempts times, and wraps the
// last error with what was dumped. The partial result of an interrupted
// dump is never returned.
func retry[T any](h Handle, what string, fn func() (T, error)) (T, error) {
	var (
		res  T
		err  error
		zero T
	)
	for range DumpAttempts {
		res, err = fn()
		if err == nil && h.interrupted != nil && h.interrupted(what) {
			err = netlink.ErrDumpInterrupted
		}
		if err == nil {
			return res, nil
		}
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return zero, fmt.Errorf("list %s: %w", what, err)
		}
	}
	return zero, fmt.Errorf("list %s: %d attempts: %w", what, DumpAttempts, err)
}

// LinkList lists the links of the namespace, retrying interrupted dumps.
func (h Handle) LinkList() ([]netlink.Link, error) {
	return retry(h, "links", h.Handle.LinkList)
}

// AddrList lists the addresses of link (every link when nil) of family
// (netlink.FAMILY_ALL, FAMILY_V4, FAMILY_V6), retrying interrupted dumps.
func (h Handle) AddrList(link netlink.Link, family int) ([]netlink.Addr, error) {
	what := "addresses"
	if link != nil {
		what = "addresses of " + link.Attrs().Name
	}
	return retry(h, what, func() ([]netlink.Addr, error) { return h.Handle.AddrList(link, family) })
}

// RouteList lists the main table's routes of link (every link when nil) of
// family, retrying interrupted dumps.
func (h Handle) RouteList(link netlink.Link, family int) ([]netlink.Route, error) {
	return retry(h, "routes", func() ([]netlink.Route, error) { return h.Handle.RouteList(link, family) })
}

// RouteListFiltered lists the routes of family matching filter on the
// fields filterMask names (netlink.RT_FILTER_* bits), retrying interrupted
// dumps. Only the main table is listed unless the mask includes
// RT_FILTER_TABLE. filter may be nil and is never written to (netlink's
// own RouteListFiltered writes to it and dereferences a nil one).
func (h Handle) RouteListFiltered(family int, filter *netlink.Route, filterMask uint64) ([]netlink.Route, error) {
	return retry(h, "routes", func() ([]netlink.Route, error) {
		var f netlink.Route
		if filter != nil {
			f = *filter
		}
		return h.Handle.RouteListFiltered(family, &f, filterMask)
	})
}

// RouteListFilteredEach is RouteListFiltered without the list: it calls
// f with each matching route as the dump is read, so that a caller that
// keeps little of each route (a reconciler comparing thousands of them)
// never holds them all. begin, when not nil, is called before each
// attempt: an interrupted attempt is retried as RouteListFiltered's is,
// and what f was shown by it is then to be dropped.
func (h Handle) RouteListFilteredEach(family int, filter *netlink.Route, filterMask uint64, begin func(), f func(netlink.Route)) error {
	_, err := retry(h, "routes", func() (struct{}, error) {
		if begin != nil {
			begin()
		}
		var fl netlink.Route
		if filter != nil {
			fl = *filter
		}
		return struct{}{}, h.Handle.RouteListFilteredIter(family, &fl, filterMask, func(r netlink.Route) bool {
			f(r)
			return true
		})
	})
	return err
}

// NeighList lists the neighbour (and FDB) entries of linkIndex (every link
// when 0) of family, retrying interrupted dumps.
func (h Handle) NeighList(linkIndex, family int) ([]netlink.Neigh, error) {
	return retry(h, "neighbours", func() ([]netlink.Neigh, error) { return h.Handle.NeighList(linkIndex, family) })
}

// NeighListEach is NeighList without the list: it calls f with each entry
// as the dump is read (its IP and HardwareAddr point into the read buffer:
// valid during the call only), so that a caller comparing thousands of
// entries never holds them all. begin, when not nil, is called before
// each attempt: an interrupted attempt is retried as NeighList's is, and
// what f was shown by it is then to be dropped. A Handle from Wrap has no
// namespace to open its own socket in: it reads the handle's list and
// walks it, as it does when no socket can be opened in the namespace.
func (h Handle) NeighListEach(linkIndex, family int, begin func(), f func(netlink.Neigh)) error {
	_, err := retry(h, "neighbours", func() (struct{}, error) {
		if begin != nil {
			begin()
		}
		if h.hasNS && h.ns.IsOpen() {
			var s *nl.NetlinkSocket
			err := InNamespace(h.ns, func() (err error) {
				s, err = nl.GetNetlinkSocketAt(netns.None(), netns.None(), unix.NETLINK_ROUTE)
				return err
			})
			if err == nil {
				defer s.Close()
				return struct{}{}, neighDump(s, linkIndex, family, f)
			}
			// No socket of its own (a namespace that cannot be entered):
			// the handle's socket is already in the namespace.
		}
		list, err := h.Handle.NeighList(linkIndex, family)
		if err != nil {
			return struct{}{}, err
		}
		for _, n := range list {
			f(n)
		}
		return struct{}{}, nil
	})
	return err
}

// neighDump reads one neighbour dump through s, filtered as netlink's
// NeighList filters (by link and family), and hands each entry to f as it
// is parsed.
func neighDump(s *nl.NetlinkSocket, linkIndex, family int, f func(netlink.Neigh)) error {
	req := nl.NewNetlinkRequest(unix.RTM_GETNEIGH, unix.NLM_F_DUMP)
	req.Sockets = map[int]*nl.SocketHandle{unix.NETLINK_ROUTE: {Socket: s}}
	req.AddData(&netlink.Ndmsg{Family: uint8(family), Index: uint32(linkIndex)})
	return req.ExecuteIter(unix.NETLINK_ROUTE, unix.RTM_NEWNEIGH, func(m []byte) bool {
		n, err := netlink.NeighDeserialize(m)
		switch {
		case err != nil: // skipped, as NeighList skips it
		case linkIndex != 0 && n.LinkIndex != linkIndex:
		case family != 0 && n.Family != family:
		default:
			f(*n)
		}
		return true
	})
}

// XfrmStateList lists the XFRM states of family (netlink.FAMILY_ALL for
// both), retrying interrupted dumps.
func (h Handle) XfrmStateList(family int) ([]netlink.XfrmState, error) {
	return retry(h, "xfrm states", func() ([]netlink.XfrmState, error) { return h.Handle.XfrmStateList(family) })
}

// XfrmPolicyList lists the XFRM policies of family (netlink.FAMILY_ALL for
// both), retrying interrupted dumps.
func (h Handle) XfrmPolicyList(family int) ([]netlink.XfrmPolicy, error) {
	return retry(h, "xfrm policies", func() ([]netlink.XfrmPolicy, error) { return h.Handle.XfrmPolicyList(family) })
}

// Open opens a netlink handle bound to ns and wraps it. The caller closes
// it with Close (the embedded *netlink.Handle's); ns stays the caller's.
// When ns is the namespace the process runs in, the socket is opened
// without setns, which needs CAP_SYS_ADMIN even into the current namespace
// (an agent in a container has only NET_ADMIN); see SubscribeNamespace.
func Open(ns netns.NsHandle) (Handle, error) {
	if !ns.IsOpen() {
		return Handle{}, errors.New("open netlink handle: namespace handle is not open")
	}
	h, err := netlink.NewHandleAt(SubscribeNamespace(ns))
	if err != nil {
		return Handle{}, fmt.Errorf("open netlink handle in namespace %s: %w", ns, err)
	}
	return New(h, ns), nil
}
