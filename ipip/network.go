package ipip

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync/atomic"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/lease"
)

// Network is a started ipip dataplane. Apply and the repairs of Run are
// serialized; it is safe for concurrent use.
type Network struct {
	env  flannel.Env
	own  lease.Lease
	mtu  int
	opts Options
	log  *slog.Logger
	rec  backend.RouteReconciler
	dev  atomic.Int64        // flannel.ipip's index, for the watchers
	r    *backend.Reconciler // serializes Apply and repairs
}

var _ flannel.Network = (*Network)(nil)

func newNetwork(env flannel.Env, own lease.Lease, mtu int, opts Options) *Network {
	log := backend.Logger(env.Logger).With("backend", Type, "iface", env.Iface.Name)
	n := &Network{env: env, own: own, mtu: mtu, opts: opts, log: log, rec: backend.RouteReconciler{Logger: log}}
	n.r = backend.NewReconciler(backend.ReconcilerConfig{Apply: n.apply, Interval: opts.RepairInterval, Logger: log})
	return n
}

// Lease returns the lease the network was started with.
func (n *Network) Lease() lease.Lease { return n.own }

// MTU is the external interface's MTU minus the outer IPv4 header.
func (n *Network) MTU() int { return n.mtu }

// Apply makes the routes of ours match peers: for each ipip peer with an
// IPv4 subnet, "subnet via <public ip> dev flannel.ipip onlink", or with
// DirectRouting and the public IP on the external interface's segment
// "subnet via <public ip> dev <external>". The device is recreated (and
// its address put back) first when it is gone or changed. Stale routes of
// ours on both links are deleted. Leases of other backend types and the
// own subnet are skipped; a peer without a public IPv4 address or whose
// route the kernel refuses yields a *flannel.PeerError in the joined
// error while the others are programmed. Apply may be called repeatedly
// with the same peers; it changes nothing then.
func (n *Network) Apply(ctx context.Context, peers []lease.Lease) error {
	return n.r.Apply(ctx, peers)
}

// Run repairs drift until ctx ends: it re-applies the last peer set every
// RepairInterval and right after flannel.ipip is deleted or set down or a
// route of ours on it or on the external interface is deleted (netlink
// subscriptions in env.NS; without an open NS only the periodic repair
// runs). Nothing is repaired before the first Apply. Repair failures are
// logged (a peer that cannot be programmed once per change of its lease)
// and retried. Run joins its goroutines and returns nil when ctx ends.
func (n *Network) Run(ctx context.Context) error {
	n.r.Run(ctx, n.watchers()...)
	return nil
}

func (n *Network) watchers() []backend.Watcher {
	if !n.env.NS.IsOpen() || n.env.NS == 0 {
		n.log.Info("no namespace handle: repairing on a timer only", "interval", n.opts.RepairInterval)
		return nil
	}
	return []backend.Watcher{
		backend.NetlinkWatcher(n.log, n.env.NS, "link", nlsafe.SubscribeLinks, func(u netlink.LinkUpdate) bool {
			return u.Link != nil && u.Link.Attrs().Name == DeviceName &&
				(u.Header.Type == unix.RTM_DELLINK || u.Link.Attrs().Flags&net.FlagUp == 0)
		}),
		backend.NetlinkWatcher(n.log, n.env.NS, "route", nlsafe.SubscribeRouteDeletes, func(u netlink.RouteUpdate) bool {
			return u.Type == unix.RTM_DELROUTE && u.Protocol == backend.RouteProtocol &&
				(u.LinkIndex == n.env.Iface.Index || int64(u.LinkIndex) == n.dev.Load())
		}),
	}
}

// ensure makes the device and its address right and returns its index.
func (n *Network) ensure() (int, error) {
	l, err := ensureDevice(n.env.Handle, n.env.Iface.IP, n.mtu, n.log)
	if err != nil {
		return 0, err
	}
	if err := ensureAddr(n.env.Handle, l, n.own.Subnet.Addr()); err != nil {
		return 0, err
	}
	n.dev.Store(int64(l.Index))
	return l.Index, nil
}

// desired computes the routes on the device and on the external interface
// and the peer each destination is for; a peer that cannot have a route
// gets an error in failed.
func (n *Network) desired(peers []lease.Lease, dev int, failed *backend.PeerErrs) (tun, ext []netlink.Route, byDst map[netip.Prefix]int) {
	byDst = map[netip.Prefix]int{}
	direct := map[netip.Addr]bool{}
	for i, p := range peers {
		if p.Attrs.BackendType != Type || !p.Subnet.IsValid() || p.Subnet == n.own.Subnet {
			continue
		}
		gw := p.Attrs.PublicIP
		if !gw.IsValid() || !gw.Is4() {
			failed.Add(i, fmt.Errorf("no public IPv4 address for subnet %s", p.Subnet))
			continue
		}
		r := netlink.Route{Dst: ipconv.IPNetFromPrefix(p.Subnet), Gw: ipconv.IPFromAddr(gw)}
		byDst[p.Subnet.Masked()] = i
		if n.opts.DirectRouting {
			d, ok := direct[gw]
			if !ok {
				d = n.isDirect(gw)
				direct[gw] = d
			}
			if d {
				r.LinkIndex = n.env.Iface.Index
				ext = append(ext, r)
				continue
			}
		}
		r.LinkIndex, r.Flags = dev, int(netlink.FLAG_ONLINK)
		tun = append(tun, r)
	}
	return tun, ext, byDst
}

// isDirect reports whether ip is reached on the external interface without
// a gateway: on its segment.
func (n *Network) isDirect(ip netip.Addr) bool {
	rs, err := n.env.Handle.RouteGet(ipconv.IPFromAddr(ip))
	if err != nil || len(rs) == 0 {
		return false
	}
	return rs[0].Gw == nil && rs[0].LinkIndex == n.env.Iface.Index
}

// apply programs peers; the Reconciler calls it with its lock held.
func (n *Network) apply(ctx context.Context, peers []lease.Lease) error {
	dev, err := n.ensure()
	if err != nil {
		return err
	}
	var failed backend.PeerErrs
	tun, ext, byDst := n.desired(peers, dev, &failed)
	var rest []error
	for _, link := range []struct {
		index  int
		routes []netlink.Route
	}{{dev, tun}, {n.env.Iface.Index, ext}} {
		err := n.rec.Reconcile(ctx, n.env.Handle, link.index, link.routes)
		for _, e := range backend.PeerErrorLeaves(err) {
			var re *backend.RouteError
			if errors.As(e, &re) && re.Op == "replace" {
				dst, _ := ipconv.PrefixFromIPNet(re.Route.Dst)
				if i, ok := byDst[dst]; ok {
					failed.Add(i, e)
					continue
				}
			}
			rest = append(rest, e)
		}
	}
	return errors.Join(append(failed.Errors(peers), rest...)...)
}
