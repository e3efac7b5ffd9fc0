package vxlan

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/lease"
)

// Network is a started vxlan dataplane. Apply and the repairs of Run are
// serialized; it is safe for concurrent use.
type Network struct {
	env  flannel.Env
	own  lease.Lease
	opts Options
	log  *slog.Logger
	rec  backend.RouteReconciler

	// r serializes Apply and repairs; its lock guards the fields below.
	r    *backend.Reconciler
	devs []*device
	// synced is true when the kernel holds what memo says (no kernel
	// error since the last full apply): the next Apply only looks at the
	// peers that changed. Repairs always dump and diff everything.
	synced bool
	memo   map[leaseKey]*peerMemo // what each peer asked for last
	socks  *sockets

	devMu    sync.Mutex // guards devIndex, read by Run's event filters
	devIndex []int      // current ifindex of each device
}

// leaseKey identifies a peer by its subnets.
type leaseKey struct{ v4, v6 netip.Prefix }

func keyOf(l lease.Lease) leaseKey { return leaseKey{l.Subnet, l.IPv6Subnet} }

// peerMemo is what one peer asks of the kernel.
type peerMemo struct {
	lease      lease.Lease
	fdb, neigh []op
	routes     []netlink.Route // normalized
	errs       []error         // why it could not be (fully) programmed
}

var _ flannel.Network = (*Network)(nil)

func newNetwork(env flannel.Env, own lease.Lease, opts Options, devs []*device) *Network {
	log := backend.Logger(env.Logger).With("backend", Type, "iface", env.Iface.Name)
	n := &Network{env: env, own: own, opts: opts, log: log, rec: backend.RouteReconciler{Logger: log}, devs: devs, socks: &sockets{}}
	n.r = backend.NewReconciler(backend.ReconcilerConfig{
		Apply: func(ctx context.Context, peers []lease.Lease) error {
			if n.synced {
				return n.applyChanges(ctx, peers)
			}
			return n.applyAll(ctx, peers)
		},
		Repair:   n.applyAll, // repairs always dump and diff everything
		Interval: opts.RepairInterval,
		Logger:   log,
	})
	runtime.AddCleanup(n, (*sockets).closeAll, n.socks)
	return n
}

// Lease returns the lease the network was started with.
func (n *Network) Lease() lease.Lease { return n.own }

// MTU is the MTU pods should use: the underlay MTU (Options.MTU or the
// external interface's) minus the encapsulation overhead, the smaller of
// the two devices' in dual-stack.
func (n *Network) MTU() int {
	mtu := 0
	for _, d := range n.devs {
		if mtu == 0 || d.spec.mtu < mtu {
			mtu = d.spec.mtu
		}
	}
	return mtu
}

// VtepMAC returns the MAC of the device for the IPv4 (v6 false) or IPv6
// underlay; nil when there is none.
func (n *Network) VtepMAC(v6 bool) (mac net.HardwareAddr) {
	n.r.Locked(func() {
		if d := n.dev(v6); d != nil {
			mac = slices.Clone(d.mac)
		}
	})
	return mac
}

func (n *Network) dev(v6 bool) *device {
	for _, d := range n.devs {
		if d.spec.v6 == v6 {
			return d
		}
	}
	return nil
}

// ensureDevicesLocked recreates a device that disappeared or changed (with
// its MAC), sets it up and puts the lease address on it.
func (n *Network) ensureDevicesLocked() error {
	for _, d := range n.devs {
		before := d.index
		if err := d.ensure(n.env, n.log); err != nil {
			return err
		}
		if before != 0 && d.index != before {
			n.log.Warn("device was recreated; replaying every peer", "device", d.spec.name, "mac", d.mac.String())
		}
		n.devMu.Lock()
		n.devIndex = n.devIndex[:0]
		for _, d := range n.devs {
			n.devIndex = append(n.devIndex, d.index)
		}
		n.devMu.Unlock()
		link := &netlink.Vxlan{LinkAttrs: netlink.LinkAttrs{Name: d.spec.name, Index: d.index}}
		p := n.own.Subnet
		if d.spec.v6 {
			p = n.own.IPv6Subnet
		}
		if !p.IsValid() {
			continue
		}
		if err := ensureAddr(n.env.Handle, link, p.Addr(), n.log); err != nil {
			return err
		}
	}
	return nil
}

// Apply makes the kernel match peers, for the families of the own lease:
// on each flannel device one permanent FDB entry (peer VTEP MAC → peer
// public IP), one permanent neighbour entry (peer subnet address → MAC) and
// one onlink route via the peer subnet address per peer; with
// DirectRouting, a peer whose public IP is reached without a gateway gets a
// route via that IP on the external interface instead. Permanent entries on
// the devices and routes of ours (backend.RouteProtocol) on the devices and
// the external interface that no peer needs are deleted. A missing or
// changed device is recreated first, with its MAC. Leases of other backend
// types and the own subnet are skipped. A peer that cannot be programmed
// (no public address, bad backend data, a kernel error) yields a
// *flannel.PeerError in the joined error while every other peer is
// programmed. Apply may be called repeatedly with the same peers; it
// changes nothing then.
func (n *Network) Apply(ctx context.Context, peers []lease.Lease) error {
	return n.r.Apply(ctx, peers)
}

// desired is the kernel state a peer set asks for, by link index.
type desired struct {
	fdb, neigh map[int][]op
	routes     map[int][]netlink.Route
	routePeer  map[routeKey]int
}

type routeKey struct {
	link int
	dst  netip.Prefix
}

// desire computes the entries for peers, and each peer's part by lease
// key. direct reports whether a public IP is on a directly connected
// network of the external interface (only called with DirectRouting).
func (n *Network) desire(peers []lease.Lease, direct func(netip.Addr) bool, failed *backend.PeerErrs) (desired, map[leaseKey]*peerMemo) {
	want := desired{fdb: map[int][]op{}, neigh: map[int][]op{}, routes: map[int][]netlink.Route{}, routePeer: make(map[routeKey]int, 2*len(peers))}
	for _, d := range n.devs {
		want.fdb[d.index] = make([]op, 0, len(peers))
		want.neigh[d.index] = make([]op, 0, len(peers))
		want.routes[d.index] = make([]netlink.Route, 0, len(peers))
	}
	memos := make(map[leaseKey]*peerMemo, len(peers))
	for i, p := range peers {
		m := n.desirePeer(i, p, direct)
		memos[keyOf(p)] = m
		for _, e := range m.errs {
			failed.Add(i, e)
		}
		for _, o := range m.fdb {
			want.fdb[o.link] = append(want.fdb[o.link], o)
		}
		for _, o := range m.neigh {
			want.neigh[o.link] = append(want.neigh[o.link], o)
		}
		for _, r := range m.routes {
			dst, _ := backend.PrefixFromIPNet(r.Dst)
			want.routes[r.LinkIndex] = append(want.routes[r.LinkIndex], r)
			want.routePeer[routeKey{r.LinkIndex, dst}] = i
		}
	}
	return want, memos
}

// desirePeer computes the entries for peer i.
func (n *Network) desirePeer(i int, p lease.Lease, direct func(netip.Addr) bool) *peerMemo {
	m := &peerMemo{lease: p}
	if p.Attrs.BackendType != Type {
		n.log.Debug("skipping peer of another backend", "subnet", p.String(), "backend_type", p.Attrs.BackendType)
		return m
	}
	if (p.Subnet.IsValid() && p.Subnet == n.own.Subnet) || (p.IPv6Subnet.IsValid() && p.IPv6Subnet == n.own.IPv6Subnet) {
		return m
	}
	addRoute := func(r netlink.Route) {
		// As RouteReconciler.Normalize does, without a slice per route.
		r.Protocol, r.Table, r.Family = backend.RouteProtocol, unix.RT_TABLE_MAIN, netlink.FAMILY_V4
		if r.Dst.IP.To4() == nil {
			r.Family = netlink.FAMILY_V6
		}
		m.routes = append(m.routes, r)
	}
	for _, v6 := range []bool{false, true} {
		subnet, public, data, fam := p.Subnet, p.Attrs.PublicIP, p.Attrs.BackendData, "IPv4"
		ownSubnet := n.own.Subnet
		if v6 {
			subnet, public, data, fam = p.IPv6Subnet, p.Attrs.PublicIPv6, p.Attrs.BackendV6Data, "IPv6"
			ownSubnet = n.own.IPv6Subnet
		}
		d := n.dev(v6)
		if !ownSubnet.IsValid() || !subnet.IsValid() || d == nil {
			continue
		}
		if !public.IsValid() {
			m.errs = append(m.errs, fmt.Errorf("no public %s address for subnet %s", fam, subnet))
			continue
		}
		if n.opts.DirectRouting && direct(public) {
			addRoute(netlink.Route{LinkIndex: n.env.Iface.Index, Dst: backend.IPNetFromPrefix(subnet), Gw: backend.IPFromAddr(public)})
			continue
		}
		bd, err := ParseBackendData(data)
		if err != nil {
			m.errs = append(m.errs, fmt.Errorf("subnet %s: %w", subnet, err))
			continue
		}
		gw := subnet.Addr()
		m.fdb = append(m.fdb, op{kind: kindFDB, link: d.index, ip: public, mac: bd.VtepMAC, peer: i})
		m.neigh = append(m.neigh, op{kind: kindNeigh, link: d.index, ip: gw, mac: bd.VtepMAC, peer: i})
		addRoute(netlink.Route{LinkIndex: d.index, Dst: backend.IPNetFromPrefix(subnet), Gw: backend.IPFromAddr(gw), Flags: int(netlink.FLAG_ONLINK)})
	}
	return m
}

// diffNeigh returns the sets for desired entries that are missing or
// differ, and deletes for permanent actual entries nobody wants. Entries
// are keyed by (link, ip) for neighbours and (link, mac, ip) for FDB
// entries. It has no side effects.
func diffNeigh(k kind, want []op, actual []netlink.Neigh) (set, del []op) {
	type key struct {
		link int
		ip   netip.Addr
		mac  string
	}
	keyFor := func(link int, ip netip.Addr, mac net.HardwareAddr) key {
		if k == kindFDB {
			return key{link, ip, string(mac)}
		}
		return key{link: link, ip: ip}
	}
	have := make(map[key]netlink.Neigh, len(actual))
	for _, a := range actual {
		if a.State&netlink.NUD_PERMANENT == 0 {
			continue
		}
		have[keyFor(a.LinkIndex, backend.AddrFromIP(a.IP), a.HardwareAddr)] = a
	}
	if len(have) == 0 { // nothing programmed yet: the common bulk case
		return want, nil
	}
	wanted := make(map[key]bool, len(want))
	for _, w := range want {
		kk := keyFor(w.link, w.ip, w.mac)
		wanted[kk] = true
		if a, ok := have[kk]; ok && sameMAC(a.HardwareAddr, w.mac) {
			continue
		}
		set = append(set, w)
	}
	for kk, a := range have {
		if wanted[kk] {
			continue
		}
		del = append(del, op{kind: k, del: true, link: a.LinkIndex, ip: backend.AddrFromIP(a.IP), mac: a.HardwareAddr, peer: -1})
	}
	slices.SortFunc(del, func(a, b op) int { return a.ip.Compare(b.ip) })
	return set, del
}

// isDirect reports whether ip is reached without a gateway through the
// external interface: the test for "same L2 segment".
func (n *Network) isDirect(ip netip.Addr) bool {
	rs, err := n.env.Handle.RouteGet(backend.IPFromAddr(ip))
	if err != nil || len(rs) == 0 {
		return false
	}
	return rs[0].Gw == nil && rs[0].LinkIndex == n.env.Iface.Index
}

// applyAll programs peers: it checks the devices (recreating a missing or
// changed one), dumps the tables and reconciles them to the whole peer
// set. The Reconciler calls it with its lock held.
func (n *Network) applyAll(ctx context.Context, peers []lease.Lease) error {
	began := time.Now()
	n.synced = false
	if err := n.ensureDevicesLocked(); err != nil {
		return err
	}
	links := []int{n.env.Iface.Index}
	for _, d := range n.devs {
		links = append(links, d.index)
	}
	// Pipelined: the kernel dumps its tables while the desired entries are
	// computed (the goroutine is always joined below).
	dumped := make(chan tables, 1)
	go func() { dumped <- n.dump(links) }()
	var failed backend.PeerErrs
	want, memos := n.desire(peers, n.directFunc(), &failed)
	tabs := <-dumped
	if tabs.err != nil {
		return tabs.err
	}

	var sets, dels []op
	for _, d := range n.devs {
		s, dl := diffNeigh(kindFDB, want.fdb[d.index], tabs.fdb[d.index])
		sets, dels = append(sets, s...), append(dels, dl...)
		s, dl = diffNeigh(kindNeigh, want.neigh[d.index], tabs.neigh[d.index])
		sets, dels = append(sets, s...), append(dels, dl...)
	}
	for _, link := range links {
		actual := tabs.routes[link]
		// Desired routes with no actual route for their destination are
		// added as they are; only the others go through DiffRoutes, which
		// copies every route several times (slow with thousands of peers).
		have := make(map[netip.Prefix]bool, len(actual))
		for _, a := range actual {
			if dst, ok := backend.PrefixFromIPNet(a.Dst); ok {
				have[dst] = true
			}
		}
		desired := want.routes[link] // normalized by desirePeer
		var overlap []netlink.Route
		for i := range desired {
			dst, _ := backend.PrefixFromIPNet(desired[i].Dst)
			if !have[dst] {
				sets = append(sets, op{kind: kindRoute, link: link, route: &desired[i], peer: want.routePeer[routeKey{link, dst}]})
				continue
			}
			overlap = append(overlap, desired[i])
		}
		add, del := backend.DiffRoutes(overlap, actual)
		for i := range add {
			dst, _ := backend.PrefixFromIPNet(add[i].Dst)
			sets = append(sets, op{kind: kindRoute, link: link, route: &add[i], peer: want.routePeer[routeKey{link, dst}]})
		}
		for i := range del {
			dels = append(dels, op{kind: kindRoute, del: true, link: link, route: &del[i], peer: -1})
		}
	}
	return n.finish(ctx, began, peers, sets, dels, &failed, memos)
}

// tables is what dump read from the kernel, by link index.
type tables struct {
	fdb, neigh map[int][]netlink.Neigh
	routes     map[int][]netlink.Route
	err        error
}

// dump lists the FDB and neighbour entries of the devices and our routes on
// links.
func (n *Network) dump(links []int) tables {
	h := n.env.Handle
	t := tables{fdb: map[int][]netlink.Neigh{}, neigh: map[int][]netlink.Neigh{}, routes: map[int][]netlink.Route{}}
	for _, d := range n.devs {
		family := netlink.FAMILY_V4
		if d.spec.v6 {
			family = netlink.FAMILY_V6
		}
		var err error
		if t.fdb[d.index], err = backend.ListNeighs(h, d.index, unix.AF_BRIDGE); err != nil {
			t.err = fmt.Errorf("device %s: %w", d.spec.name, err)
			return t
		}
		if t.neigh[d.index], err = backend.ListNeighs(h, d.index, family); err != nil {
			t.err = fmt.Errorf("device %s: %w", d.spec.name, err)
			return t
		}
	}
	for _, link := range links {
		var err error
		if t.routes[link], err = n.rec.Owned(h, link); err != nil {
			t.err = err
			return t
		}
	}
	return t
}

// applyChanges programs peers when the kernel is known to hold what the
// last Apply asked for: only peers that are new, changed or gone are
// looked at, so a new peer costs its own entries, not a dump of every
// peer's. Peers' entries are assumed not to overlap (distinct subnets,
// MACs and public IPs); the periodic full repair corrects anything else.
func (n *Network) applyChanges(ctx context.Context, peers []lease.Lease) error {
	began := time.Now()
	n.synced = false
	var failed backend.PeerErrs
	direct := n.directFunc()
	memos := make(map[leaseKey]*peerMemo, len(peers))
	var sets, dels []op
	for i, p := range peers {
		k := keyOf(p)
		old, had := n.memo[k]
		if had && sameLease(old.lease, p) {
			memos[k] = old
			for _, e := range old.errs {
				failed.Add(i, e)
			}
			continue
		}
		m := n.desirePeer(i, p, direct)
		memos[k] = m
		for _, e := range m.errs {
			failed.Add(i, e)
		}
		if !had {
			old = &peerMemo{}
		}
		s, d := diffMemo(old, m, i)
		sets, dels = append(sets, s...), append(dels, d...)
	}
	for k, old := range n.memo {
		if _, ok := memos[k]; !ok {
			_, d := diffMemo(old, &peerMemo{}, -1)
			dels = append(dels, d...)
		}
	}
	return n.finish(ctx, began, peers, sets, dels, &failed, memos)
}

// sameLease reports whether a peer's lease asks for the same entries.
func sameLease(a, b lease.Lease) bool {
	return a.SameSubnets(b) && a.Attrs.Equal(b.Attrs)
}

// diffMemo returns the changes that turn a peer's old entries into its new
// ones (sets tagged with peer).
func diffMemo(old, cur *peerMemo, peer int) (sets, dels []op) {
	for _, k := range []kind{kindFDB, kindNeigh} {
		o, c := old.fdb, cur.fdb
		if k == kindNeigh {
			o, c = old.neigh, cur.neigh
		}
		s, d := diffNeigh(k, c, asNeighs(o))
		sets, dels = append(sets, s...), append(dels, d...)
	}
	add, del := backend.DiffRoutes(cur.routes, old.routes)
	for i := range add {
		sets = append(sets, op{kind: kindRoute, link: add[i].LinkIndex, route: &add[i], peer: peer})
	}
	for i := range del {
		dels = append(dels, op{kind: kindRoute, del: true, link: del[i].LinkIndex, route: &del[i], peer: -1})
	}
	return sets, dels
}

// directFunc returns the DirectRouting test, cached for one Apply.
func (n *Network) directFunc() func(netip.Addr) bool {
	cache := map[netip.Addr]bool{}
	return func(ip netip.Addr) bool {
		d, ok := cache[ip]
		if !ok {
			d = n.isDirect(ip)
			cache[ip] = d
		}
		return d
	}
}

// finish programs sets, then dels, records the peers' entries and whether
// the kernel is now known to match them, and returns the peers' errors.
func (n *Network) finish(ctx context.Context, began time.Time, peers []lease.Lease, sets, dels []op, failed *backend.PeerErrs, memos map[leaseKey]*peerMemo) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	// Make before break: sets (FDB, neighbours, routes) before deletes
	// (routes first, so no route points at a vanished neighbour).
	slices.SortStableFunc(dels, func(a, b op) int { return int(b.kind) - int(a.kind) })
	ops := append(sets, dels...)
	start := time.Now()
	errs := n.program(ops)
	kernelOK := true
	var rest []error
	for i, e := range errs {
		if e == nil {
			continue
		}
		kernelOK = false
		e = fmt.Errorf("%s: %w", ops[i], e)
		if p := ops[i].peer; p >= 0 {
			failed.Add(p, e)
		} else {
			rest = append(rest, e)
		}
	}
	n.log.Debug("programmed", "sets", len(sets), "deletes", len(dels), "diff_took", start.Sub(began), "program_took", time.Since(start))
	// Peers skipped for bad data have nothing in the kernel, as their memo
	// says; only kernel errors leave the state unknown.
	n.synced, n.memo = kernelOK, memos
	return errors.Join(append(failed.Errors(peers), rest...)...)
}

// asNeighs renders desired neighbour or FDB ops as a dump would show them.
func asNeighs(ops []op) []netlink.Neigh {
	out := make([]netlink.Neigh, len(ops))
	for i, o := range ops {
		out[i] = netlink.Neigh{LinkIndex: o.link, IP: backend.IPFromAddr(o.ip), HardwareAddr: o.mac, State: netlink.NUD_PERMANENT}
	}
	return out
}

// program writes ops through raw netlink sockets in the node namespace, or
// through the handle when there is no namespace to open them in.
func (n *Network) program(ops []op) []error {
	if len(ops) == 0 {
		return nil
	}
	if !n.env.NS.IsOpen() {
		return program(nil, n.env.Handle, ops)
	}
	k := min(n.opts.Sockets, max(1, len(ops)/256))
	for len(n.socks.ws) < k {
		w, err := newWriter(n.env.NS)
		if err != nil {
			n.log.Warn("raw netlink socket unavailable; programming through the handle", "err", err)
			return program(nil, n.env.Handle, ops)
		}
		n.socks.ws = append(n.socks.ws, w)
	}
	errs := program(n.socks.ws[:k], n.env.Handle, ops)
	n.socks.dropBroken()
	return errs
}

// sockets are the raw netlink writers a Network keeps between Applies
// (opening one in the namespace costs a thread switch). They are closed
// when the Network is garbage collected.
type sockets struct{ ws []*writer }

func (s *sockets) dropBroken() {
	s.ws = slices.DeleteFunc(s.ws, func(w *writer) bool {
		if w.broken {
			w.Close()
		}
		return w.broken
	})
}

func (s *sockets) closeAll() {
	for _, w := range s.ws {
		w.Close()
	}
	s.ws = nil
}
