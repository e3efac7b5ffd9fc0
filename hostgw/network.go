package hostgw

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"syscall"
	"time"

	"github.com/vishvananda/netlink"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/lease"
)

// Network is a started host-gw dataplane. Apply and the repairs of Run are
// serialized; it is safe for concurrent use.
type Network struct {
	env      flannel.Env
	own      lease.Lease
	interval time.Duration
	log      *slog.Logger
	rec      backend.RouteReconciler
	r        *backend.Reconciler // serializes Apply and repairs
}

var _ flannel.Network = (*Network)(nil)

func newNetwork(env flannel.Env, own lease.Lease, interval time.Duration) *Network {
	log := backend.Logger(env.Logger).With("backend", Type, "iface", env.Iface.Name)
	n := &Network{
		env:      env,
		own:      own,
		interval: interval,
		log:      log,
		// Routes upstream flanneld left (a node migrated from it) are
		// adopted: replaced by ours, or deleted for peers gone meanwhile.
		rec: backend.RouteReconciler{Logger: log, Adopt: backend.UpstreamRoute(env.Config, own)},
	}
	n.r = backend.NewReconciler(backend.ReconcilerConfig{Apply: n.apply, Interval: interval, Logger: log})
	return n
}

// Lease returns the lease the network was started with.
func (n *Network) Lease() lease.Lease { return n.own }

// MTU is the external interface's MTU: host-gw adds no header.
func (n *Network) MTU() int { return n.env.Iface.MTU }

// Apply makes the routes on the external interface match peers: one route
// per peer subnet via the peer's public address of that family, for the
// families of the own lease. Leases of other backend types and the own
// subnet are skipped. Routes of ours (backend.RouteProtocol) for peers not
// in the set, including those left by a previous run, are deleted; other
// routes are left alone. A peer that cannot be programmed (no public address
// of the family, or a public address not directly reachable on the
// interface) yields a *flannel.PeerError in the joined error while every
// other peer is programmed. Apply may be called repeatedly with the same
// peers; it changes nothing then.
func (n *Network) Apply(ctx context.Context, peers []lease.Lease) error {
	return n.r.Apply(ctx, peers)
}

// peerRoute is a desired route and the index of the peer it is for.
type peerRoute struct {
	route netlink.Route
	peer  int
}

// desired computes the routes for peers and records each peer that
// cannot have one.
func (n *Network) desired(peers []lease.Lease, failed *backend.PeerErrs) []peerRoute {
	var routes []peerRoute
	for i, p := range peers {
		if p.Attrs.BackendType != Type {
			n.log.Debug("skipping peer of another backend", "subnet", p.String(), "backend_type", p.Attrs.BackendType)
			continue
		}
		if (p.Subnet.IsValid() && p.Subnet == n.own.Subnet) || (p.IPv6Subnet.IsValid() && p.IPv6Subnet == n.own.IPv6Subnet) {
			continue
		}
		add := func(dst netip.Prefix, gw netip.Addr, family string) {
			if !gw.IsValid() {
				failed.Add(i, fmt.Errorf("no public %s address for subnet %s", family, dst))
				return
			}
			routes = append(routes, peerRoute{peer: i, route: netlink.Route{
				LinkIndex: n.env.Iface.Index,
				Dst:       ipconv.IPNetFromPrefix(dst),
				Gw:        ipconv.IPFromAddr(gw),
			}})
		}
		if n.own.Subnet.IsValid() && p.Subnet.IsValid() {
			add(p.Subnet, p.Attrs.PublicIP, "IPv4")
		}
		if n.own.IPv6Subnet.IsValid() && p.IPv6Subnet.IsValid() {
			add(p.IPv6Subnet, p.Attrs.PublicIPv6, "IPv6")
		}
	}
	return routes
}

// apply programs peers; the Reconciler calls it with its lock held.
func (n *Network) apply(ctx context.Context, peers []lease.Lease) error {
	var failed backend.PeerErrs
	want := n.desired(peers, &failed)
	routes := make([]netlink.Route, 0, len(want))
	byDst := make(map[netip.Prefix]int, len(want))
	for _, w := range want {
		routes = append(routes, w.route)
		dst, _ := ipconv.PrefixFromIPNet(w.route.Dst)
		byDst[dst] = w.peer
	}
	var rest []error
	if err := n.rec.Reconcile(ctx, n.env.Handle, n.env.Iface.Index, routes); err != nil {
		// Map each failed route back to its peer.
		for _, e := range flatten(err) {
			var re *backend.RouteError
			if !errors.As(e, &re) || re.Op != "replace" {
				rest = append(rest, e)
				continue
			}
			dst, _ := ipconv.PrefixFromIPNet(re.Route.Dst)
			peer, ok := byDst[dst]
			if !ok {
				rest = append(rest, e)
				continue
			}
			if errors.Is(re.Err, syscall.ENETUNREACH) || errors.Is(re.Err, syscall.EHOSTUNREACH) {
				e = fmt.Errorf("gateway %s is not directly reachable on %s (host-gw needs all nodes on one L2 segment): %w",
					re.Route.Gw, n.env.Iface.Name, re)
			}
			failed.Add(peer, e)
		}
	}
	return errors.Join(append(failed.Errors(peers), rest...)...)
}

// flatten unpacks a joined error into its parts.
func flatten(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}
