package vxlan

import (
	"context"
	"errors"
	"hash/maphash"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"

	"github.com/vishvananda/netlink"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/ipconv"
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
	memo   memoBook // what each peer asked for last
	// spare is the order array of the book memo replaced (cleared), for
	// applyChanges' next book: a join allocates no array of every peer.
	spare []*peerMemo
	index tableIndex // check's, kept for its arrays
	chunk int        // chunkOps; smaller in tests

	routeProto, routeTable uint8  // rec's protocol and table, as memos keep them
	gen                    uint64 // applyChanges' generation (peerMemo.gen)
	socks                  *sockets

	devMu    sync.Mutex // guards devIndex, read by Run's event filters
	devIndex []int      // current ifindex of each device

	// watchUp says, per kernel subscription of Run, whether it is open:
	// only then do periodic ticks skip the full pass (Options.ResyncInterval).
	watchUp [3]atomic.Bool
}

// leaseKey identifies a peer by its subnets: 34 bytes of plain memory,
// hashed as they are (two netip.Prefix are 64 bytes, a zone pointer
// each).
type leaseKey struct {
	v4, v6 [16]byte // the subnets' addresses (As16)
	b4, b6 uint8    // their lengths; noSubnet when the lease has none
}

// noSubnet is leaseKey's length of a family the lease has no subnet of.
const noSubnet = 0xff

func keyOf(l lease.Lease) leaseKey {
	k := leaseKey{b4: noSubnet, b6: noSubnet}
	if p := l.Subnet; p.IsValid() {
		k.v4, k.b4 = p.Addr().As16(), uint8(p.Bits())
	}
	if p := l.IPv6Subnet; p.IsValid() {
		k.v6, k.b6 = p.Addr().As16(), uint8(p.Bits())
	}
	return k
}

// prefix is the key's subnet of one family (invalid when it has none).
func (k leaseKey) prefix(v6 bool) netip.Prefix {
	a, b := k.v4, k.b4
	if v6 {
		a, b = k.v6, k.b6
	}
	if b == noSubnet {
		return netip.Prefix{}
	}
	addr := netip.AddrFrom16(a)
	if !v6 {
		addr = addr.Unmap()
	}
	return netip.PrefixFrom(addr, int(b))
}

// peerMemo is what one peer asks of the kernel: per family, how it is
// reached and its VTEP's MAC, from which its entries are derived as they
// are needed (each, spec). 208 bytes and one allocation per peer: kept
// for every peer between Applies.
type peerMemo struct {
	key    leaseKey
	proto  uint8 // the routes' rtm_protocol and rtm_table
	table  uint8
	stale  bool  // replaced in or dropped from memoBook.byKey
	direct uint8 // with DirectRouting: directBits when computed
	fam    [2]famMemo
	attrs  lease.Attrs
	errs   []error // why it could not be (fully) programmed
	gen    uint64  // the applyChanges call that last saw it
}

// famMemo is one family's part of a peer's memo.
type famMemo struct {
	mode reach
	mac  [6]byte // famOverlay: the peer's VTEP MAC
	link int32   // the flannel device (famOverlay) or the external interface (famDirect)
}

// reach is how a peer's subnet of one family is reached.
type reach uint8

const (
	famNone    reach = iota // not at all (no such subnet, or an error)
	famOverlay              // through the vxlan device: FDB entry, neighbour and onlink route
	famDirect               // DirectRouting: a route via its public address
)

// same reports whether p asks for the entries m was computed from.
func (m *peerMemo) same(p lease.Lease) bool { return m.key == keyOf(p) && m.attrs.Equal(p.Attrs) }

func (m *peerMemo) subnet(v6 bool) netip.Prefix { return m.key.prefix(v6) }

func (m *peerMemo) public(v6 bool) netip.Addr {
	if v6 {
		return m.attrs.PublicIPv6
	}
	return m.attrs.PublicIP
}

// each calls f with each of m's entries, as sets tagged with peer: per
// family its FDB entry, neighbour and route.
func (m *peerMemo) each(peer int, f func(op)) {
	for i := range m.fam {
		e, v6 := &m.fam[i], i == 1
		if e.mode == famOverlay {
			f(op{kind: kindFDB, link: int(e.link), ip: m.public(v6), mac: e.mac[:], peer: peer})
			f(op{kind: kindNeigh, link: int(e.link), ip: m.subnet(v6).Addr(), mac: e.mac[:], peer: peer})
		}
		if e.mode != famNone {
			f(op{kind: kindRoute, link: int(e.link), memo: m, v6: v6, peer: peer})
		}
	}
}

// ops returns m's entries of kind k, as sets tagged with peer.
func (m *peerMemo) ops(k kind, peer int) []op {
	var out []op
	m.each(peer, func(o op) {
		if o.kind == k {
			out = append(out, o)
		}
	})
	return out
}

// specs returns m's routes.
func (m *peerMemo) specs() []routeSpec {
	var out []routeSpec
	for _, o := range m.ops(kindRoute, 0) {
		out = append(out, m.spec(o.v6))
	}
	return out
}

// spec is m's route for one family.
func (m *peerMemo) spec(v6 bool) routeSpec {
	e := &m.fam[0]
	if v6 {
		e = &m.fam[1]
	}
	dst := m.subnet(v6)
	r := routeSpec{link: int(e.link), dst: dst, gw: dst.Addr(), onlink: true, proto: m.proto, table: m.table}
	if e.mode == famDirect {
		r.gw, r.onlink = m.public(v6), false
	}
	return r
}

// routeSpec is one route a peer asks for: to dst via gw on link (onlink
// through a flannel device, plain on the external interface), in the
// reconciler's table with its protocol.
type routeSpec struct {
	link         int
	dst          netip.Prefix
	gw           netip.Addr
	onlink       bool
	proto, table uint8 // as rtm_protocol and rtm_table
}

// netlink renders the spec as the normalized route it stands for.
func (r *routeSpec) netlink() netlink.Route {
	nr := r.attrs(ipconv.IPFromAddr(r.gw))
	nr.Dst = ipconv.IPNetFromPrefix(r.dst)
	return nr
}

// attrs is the route without its destination (which SameRoute does not
// compare), with gw as its gateway.
func (r *routeSpec) attrs(gw net.IP) netlink.Route {
	nr := netlink.Route{LinkIndex: r.link, Gw: gw, Protocol: netlink.RouteProtocol(r.proto), Table: int(r.table), Family: netlink.FAMILY_V4}
	if r.dst.Addr().Is6() {
		nr.Family = netlink.FAMILY_V6
	}
	if r.onlink {
		nr.Flags = int(netlink.FLAG_ONLINK)
	}
	return nr
}

// route renders the spec as the netlink route n's reconciler programs and
// lists.
func (n *Network) route(r routeSpec) netlink.Route { return n.rec.Normalized(r.link, r.netlink()) }

// routes renders specs as netlink routes.
func (n *Network) routes(specs []routeSpec) []netlink.Route {
	out := make([]netlink.Route, len(specs))
	for i, r := range specs {
		out[i] = n.route(r)
	}
	return out
}

// memoBook is every peer's memo, by lease key and in the order of the
// peers of the Apply that recorded them: a store hands peers in the same
// order each time, so applyChanges finds most memos by walking the order
// instead of hashing every peer's key.
type memoBook struct {
	byKey *memoIndex // shared by the books applyChanges derives from one another
	order []*peerMemo
	stamp memoStamp // what every memo was computed against
}

// memoIndex finds memos by lease key: a map by a hash of the key (a slot
// is 16 bytes; with the 64-byte key it would be 72, 3 MB at 20,000
// peers), and the rare memo whose hash another key already has in clash.
type memoIndex struct {
	seed   maphash.Seed
	byHash map[uint64]*peerMemo
	clash  map[leaseKey]*peerMemo
}

func newMemoIndex(n int) *memoIndex {
	return &memoIndex{seed: maphash.MakeSeed(), byHash: make(map[uint64]*peerMemo, n), clash: map[leaseKey]*peerMemo{}}
}

func (x *memoIndex) hash(k leaseKey) uint64 {
	return maphash.Comparable(x.seed, k) // plain memory: hashed as bytes
}

func (x *memoIndex) get(k leaseKey) (*peerMemo, bool) {
	if m := x.byHash[x.hash(k)]; m != nil && m.key == k {
		return m, true
	}
	m, ok := x.clash[k]
	return m, ok
}

func (x *memoIndex) put(m *peerMemo) {
	h := x.hash(m.key)
	if cur := x.byHash[h]; cur == nil || cur.key == m.key {
		x.byHash[h] = m
		delete(x.clash, m.key)
		return
	}
	x.clash[m.key] = m
}

func (x *memoIndex) remove(k leaseKey) {
	h := x.hash(k)
	if m := x.byHash[h]; m != nil && m.key == k {
		delete(x.byHash, h)
	}
	delete(x.clash, k)
}

// memoStamp is what, besides its lease and DirectRouting's answer, a peer's
// memo depends on: the own subnets and the links' indexes. A full apply
// reuses a memo only under the same stamp.
type memoStamp struct {
	own   leaseKey
	iface int
	devs  [2]int
}

// stampLocked returns the current memoStamp (after ensureDevicesLocked).
func (n *Network) stampLocked() memoStamp {
	st := memoStamp{own: keyOf(n.own), iface: n.env.Iface.Index}
	for i, d := range n.devs {
		if i < len(st.devs) {
			st.devs[i] = d.index
		}
	}
	return st
}

// directBits is DirectRouting's answer for p's public addresses (bit 0
// IPv4, bit 1 IPv6), 0 without DirectRouting.
func (n *Network) directBits(p lease.Lease, direct func(netip.Addr) bool) uint8 {
	if !n.opts.DirectRouting {
		return 0
	}
	var b uint8
	if p.Attrs.PublicIP.IsValid() && direct(p.Attrs.PublicIP) {
		b |= 1
	}
	if p.Attrs.PublicIPv6.IsValid() && direct(p.Attrs.PublicIPv6) {
		b |= 2
	}
	return b
}

// newMemoBook returns an empty book sized for n peers.
func newMemoBook(n int, stamp memoStamp) memoBook {
	return memoBook{byKey: newMemoIndex(n), order: make([]*peerMemo, 0, n), stamp: stamp}
}

// set records m as the memo of its lease's key, after those set before.
func (b *memoBook) set(m *peerMemo) {
	if old, ok := b.byKey.get(m.key); ok && old != m {
		old.stale = true
	}
	b.byKey.put(m)
	b.order = append(b.order, m)
}

var _ flannel.Network = (*Network)(nil)

func newNetwork(env flannel.Env, own lease.Lease, opts Options, devs []*device) *Network {
	log := backend.Logger(env.Logger).With("backend", Type, "iface", env.Iface.Name)
	n := &Network{env: env, own: own, opts: opts, log: log, rec: backend.RouteReconciler{Logger: log}, devs: devs, socks: &sockets{}, chunk: chunkOps}
	norm := n.rec.Normalized(0, netlink.Route{})
	n.routeProto, n.routeTable = uint8(norm.Protocol), uint8(norm.Table)
	n.r = backend.NewReconciler(backend.ReconcilerConfig{
		Apply: func(ctx context.Context, peers []lease.Lease) error {
			if n.synced {
				return n.applyChanges(ctx, peers)
			}
			return n.applyAll(ctx, peers)
		},
		Repair:   n.applyAll, // repairs always dump and diff everything
		Interval: opts.RepairInterval,
		Resync:   opts.ResyncInterval,
		Synced:   n.syncedLocked,
		Logger:   log,
	})
	runtime.AddCleanup(n, (*sockets).closeAll, n.socks)
	return n
}

// syncedLocked reports whether the kernel is known to hold the last peer
// set and every kernel subscription is open (see Options.ResyncInterval).
func (n *Network) syncedLocked() bool {
	if !n.synced || !n.env.NS.IsOpen() {
		return false
	}
	for i := range n.watchUp {
		if !n.watchUp[i].Load() {
			return false
		}
	}
	return true
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

// isDirect reports whether ip is reached without a gateway through the
// external interface: the test for "same L2 segment".
func (n *Network) isDirect(ip netip.Addr) bool {
	rs, err := n.env.Handle.RouteGet(ipconv.IPFromAddr(ip))
	if err != nil || len(rs) == 0 {
		return false
	}
	return rs[0].Gw == nil && rs[0].LinkIndex == n.env.Iface.Index
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

// program writes ops through raw netlink sockets in the node namespace, or
// through the handle when there is no namespace to open them in.
func (n *Network) program(ops []op) []error {
	if len(ops) == 0 {
		return nil
	}
	if !n.env.NS.IsOpen() {
		return program(nil, n.env.Handle, ops)
	}
	ws, err := n.writers(min(n.opts.Sockets, max(1, len(ops)/256)))
	if err != nil {
		n.log.Warn("raw netlink socket unavailable; programming through the handle", "err", err)
		return program(nil, n.env.Handle, ops)
	}
	errs := program(ws, n.env.Handle, ops)
	n.socks.dropBroken()
	return errs
}

// writers returns k raw writers in the node namespace, opening those
// missing; without a namespace handle there are none.
func (n *Network) writers(k int) ([]*writer, error) {
	if !n.env.NS.IsOpen() {
		return nil, errors.New("no namespace handle to open raw netlink sockets in")
	}
	for len(n.socks.ws) < k {
		w, err := newWriter(n.env.NS)
		if err != nil {
			return nil, err
		}
		n.socks.ws = append(n.socks.ws, w)
	}
	return n.socks.ws[:k], nil
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
