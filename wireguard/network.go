package wireguard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/lease"
)

// Network is a started wireguard dataplane: apply, which makes the kernel
// match a peer set, and the watchers whose kernel events trigger a repair,
// on a backend.Reconciler. Apply and the repairs are serialized; it is
// safe for concurrent use.
type Network struct {
	env  flannel.Env
	own  lease.Lease
	opts Options
	log  *slog.Logger
	key  wgtypes.Key
	devs []devSpec
	rec  backend.RouteReconciler
	r    *backend.Reconciler // serializes Apply and repairs

	idxMu sync.Mutex     // guards index, read by the watchers' filters
	index map[string]int // device name -> ifindex
}

var _ flannel.Network = (*Network)(nil)

func newNetwork(env flannel.Env, own lease.Lease, opts Options, devs []devSpec, key wgtypes.Key) *Network {
	log := backend.Logger(env.Logger).With("backend", Type)
	n := &Network{
		env: env, own: own, opts: opts, log: log, key: key, devs: devs,
		rec:   backend.RouteReconciler{Logger: log},
		index: map[string]int{},
	}
	n.r = backend.NewReconciler(backend.ReconcilerConfig{Apply: n.apply, Interval: opts.RepairInterval, Logger: log})
	return n
}

// Lease returns the lease the network was started with.
func (n *Network) Lease() lease.Lease { return n.own }

// MTU is the MTU pods should use: the underlay MTU minus the WireGuard
// overhead (60 over IPv4, 80 over IPv6), the smaller device's in
// dual-stack.
func (n *Network) MTU() int {
	mtu := 0
	for _, d := range n.devs {
		if mtu == 0 || d.mtu < mtu {
			mtu = d.mtu
		}
	}
	return mtu
}

// PublicKey returns the node's public key, base64 as published.
func (n *Network) PublicKey() string { return n.key.PublicKey().String() }

// Apply makes the kernel match peers (the other nodes' leases): the
// devices exist (recreated when deleted) with the key, listen port, the
// lease's addresses and the route of the cluster network; each device has
// exactly one WireGuard peer per peer node, with its published public key,
// an endpoint at its public address and published port, its subnet(s) as
// AllowedIPs, and the configured keepalive and PSK. Peers not in the set
// (including a previous run's, or added by hand) are removed; a changed
// key or endpoint is updated in place. Leases of other backends are
// skipped. A peer that cannot be programmed (no or a malformed public
// key, no public address of the family) yields a *flannel.PeerError.
// Apply may be called repeatedly with the same peers; it changes nothing
// then.
func (n *Network) Apply(ctx context.Context, peers []lease.Lease) error {
	return n.r.Apply(ctx, peers)
}

// Run repairs drift until ctx ends: it re-applies the last peer set every
// RepairInterval (a peer deleted by hand is noticed so: WireGuard sends
// no notification for it), and right away when a flannel device is
// deleted or set down, or a route of ours on one is deleted (netlink
// subscriptions in env.NS, retried with capped backoff). A deleted device
// is recreated and every peer replayed. Nothing is repaired before the
// first Apply. Repair failures are logged (a peer that cannot be
// programmed once per change of its lease) and retried. Run joins its
// goroutines and returns nil when ctx ends.
func (n *Network) Run(ctx context.Context) error {
	n.r.Run(ctx, n.watchers()...)
	return nil
}

// watchers are the kernel event sources of Run.
func (n *Network) watchers() []backend.Watcher {
	names := map[string]bool{}
	for _, d := range n.devs {
		names[d.name] = true
	}
	return []backend.Watcher{
		backend.NetlinkWatcher(n.log, n.env.NS, "link", nlsafe.SubscribeLinks, func(u netlink.LinkUpdate) bool {
			return u.Link != nil && names[u.Link.Attrs().Name] &&
				(u.Header.Type == unix.RTM_DELLINK || u.Link.Attrs().Flags&net.FlagUp == 0)
		}),
		backend.NetlinkWatcher(n.log, n.env.NS, "route", nlsafe.SubscribeRouteDeletes, func(u netlink.RouteUpdate) bool {
			return u.Type == unix.RTM_DELROUTE && u.Protocol == backend.RouteProtocol && n.ours(u.LinkIndex)
		}),
	}
}

// ours reports whether link is one of our devices (indexes change when a
// device is recreated).
func (n *Network) ours(link int) bool {
	n.idxMu.Lock()
	defer n.idxMu.Unlock()
	for _, i := range n.index {
		if i == link {
			return true
		}
	}
	return false
}

// setup prepares the devices for the first Apply (Start).
func (n *Network) setup(ctx context.Context) (err error) {
	n.r.Locked(func() {
		var links map[string]netlink.Link
		if links, err = n.ensureLinks(); err == nil {
			err = n.routes(ctx, links, nil)
		}
	})
	return err
}

// ensureLinks makes every device exist, up, with its MTU, key, port and
// addresses, and returns their links by name.
func (n *Network) ensureLinks() (map[string]netlink.Link, error) {
	links := map[string]netlink.Link{}
	var recreated []string
	for _, d := range n.devs {
		link, err := ensureLink(n.env.Handle, d, n.log)
		if err != nil {
			return nil, err
		}
		links[d.name] = link
		if err := ensureAddrs(n.env.Handle, link, n.addrs(d)); err != nil {
			return nil, err
		}
		n.idxMu.Lock()
		if old, ok := n.index[d.name]; ok && old != link.Attrs().Index {
			recreated = append(recreated, d.name)
		}
		n.index[d.name] = link.Attrs().Index
		n.idxMu.Unlock()
	}
	for _, name := range recreated {
		n.log.Warn("device was deleted; recreated it, replaying every peer", "device", name)
	}
	return links, nil
}

// addrs are the addresses of device d: the lease's subnet addresses
// (10.244.3.0/32, fd00:10:244:3::/128), as upstream assigns them.
func (n *Network) addrs(d devSpec) []netip.Prefix {
	var out []netip.Prefix
	if d.v4 && n.own.Subnet.IsValid() {
		out = append(out, netip.PrefixFrom(n.own.Subnet.Masked().Addr(), 32))
	}
	if d.v6 && n.own.IPv6Subnet.IsValid() {
		out = append(out, netip.PrefixFrom(n.own.IPv6Subnet.Masked().Addr(), 128))
	}
	return out
}

// routes routes the cluster network of each family through its device
// (when the configuration names none, each peer's subnet).
func (n *Network) routes(ctx context.Context, links map[string]netlink.Link, want map[string][]wantPeer) error {
	var errs []error
	for _, d := range n.devs {
		idx := links[d.name].Attrs().Index
		var dsts []netip.Prefix
		for _, f := range []struct {
			on  bool
			net netip.Prefix
		}{{d.v4, n.env.Config.Network}, {d.v6, n.env.Config.IPv6Network}} {
			if !f.on {
				continue
			}
			if f.net.IsValid() {
				dsts = append(dsts, f.net.Masked())
				continue
			}
			for _, w := range want[d.name] {
				for _, p := range w.allowed {
					if p.Addr().Is4() == (f.net == n.env.Config.Network) {
						dsts = append(dsts, p)
					}
				}
			}
		}
		var rs []netlink.Route
		for _, dst := range dsts {
			r := netlink.Route{LinkIndex: idx, Dst: ipconv.IPNetFromPrefix(dst)}
			if dst.Addr().Is4() {
				r.Scope = netlink.SCOPE_LINK // IPv6 routes have no scope
			}
			rs = append(rs, r)
		}
		if err := n.rec.Reconcile(ctx, n.env.Handle, idx, rs); err != nil {
			errs = append(errs, fmt.Errorf("routes on %s: %w", d.name, err))
		}
	}
	return errors.Join(errs...)
}

// apply makes the kernel match peers; the Reconciler calls it with its
// lock held.
func (n *Network) apply(ctx context.Context, peers []lease.Lease) error {
	links, err := n.ensureLinks()
	if err != nil {
		return fmt.Errorf("wireguard: %w", err)
	}
	l := local{own: n.own, pub: n.key.PublicKey(), opts: n.opts, publicIP: n.env.Iface.PublicIP, publicIPv6: n.env.Iface.PublicIPv6}
	failed := map[int]error{}
	want := map[string][]wantPeer{}
	for _, d := range n.devs {
		want[d.name] = desiredPeers(l, d, peers, failed)
	}
	var rest []error
	if err := n.programPeers(want); err != nil {
		rest = append(rest, err)
	}
	if err := n.routes(ctx, links, want); err != nil {
		rest = append(rest, err)
	}
	return n.report(peers, failed, rest)
}

// programPeers gives each device its wanted peers through wgctrl.
func (n *Network) programPeers(want map[string][]wantPeer) error {
	var psk wgtypes.Key
	copy(psk[:], n.opts.PSK)
	s := settings{psk: psk, keepalive: n.opts.PersistentKeepalive}
	return withClient(n.env.NS, func(c *wgctrl.Client) error {
		var errs []error
		for _, d := range n.devs {
			st, err := deviceState(c, d.name)
			if err == nil {
				err = configureIdentity(c, st, n.key, d.port)
			}
			if err != nil {
				errs = append(errs, err)
				continue
			}
			ops := planPeers(want[d.name], st.Peers, s)
			if len(ops) == 0 {
				continue
			}
			if err := c.ConfigureDevice(d.name, wgtypes.Config{Peers: ops}); err != nil {
				errs = append(errs, fmt.Errorf("configure peers of %s: %w", d.name, err))
				continue
			}
			n.logChanges(d.name, ops)
		}
		return errors.Join(errs...)
	})
}

func (n *Network) logChanges(dev string, ops []wgtypes.PeerConfig) {
	for _, op := range ops {
		if op.Remove {
			n.log.Info("peer removed", "device", dev, "public_key", op.PublicKey.String())
			continue
		}
		var allowed []string
		for _, a := range op.AllowedIPs {
			allowed = append(allowed, a.String())
		}
		n.log.Info("peer programmed", "device", dev, "public_key", op.PublicKey.String(),
			"endpoint", op.Endpoint.String(), "allowed_ips", allowed)
	}
}

// report joins a *flannel.PeerError per failed lease (by index, in the
// order of peers) with the other errors.
func (n *Network) report(peers []lease.Lease, failed map[int]error, rest []error) error {
	var pe backend.PeerErrs
	for i := range peers {
		if err, ok := failed[i]; ok {
			pe.Add(i, err)
		}
	}
	if err := errors.Join(append(pe.Errors(peers), rest...)...); err != nil {
		return fmt.Errorf("wireguard: %w", err)
	}
	return nil
}
