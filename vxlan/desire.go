package vxlan

import (
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/vishvananda/netlink"

	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/lease"
)

// desire computes each peer's memo, by lease key and in the order of
// peers. direct reports whether a public IP is on a directly connected
// network of the external interface (only called with DirectRouting).
// A peer whose lease, DirectRouting answer and links are those of its memo
// in prev, and that had no error, keeps that memo: a periodic full repair
// of an unchanged peer set computes nothing again.
func (n *Network) desire(peers []lease.Lease, direct func(netip.Addr) bool, failed *backend.PeerErrs, prev memoBook) memoBook {
	stamp := n.stampLocked()
	reuse := prev.byKey != nil && prev.stamp == stamp
	if reuse && n.unchanged(prev, peers, direct) {
		return prev // the periodic resync: not even a new book
	}
	memos := newMemoBook(len(peers), stamp)
	j := 0 // the next memo of prev.order to match
	for i, p := range peers {
		var m *peerMemo
		if reuse {
			if old, ok := findMemo(prev, &j, keyOf(p)); ok && len(old.errs) == 0 && old.attrs.Equal(p.Attrs) && old.direct == n.directBits(p, direct) {
				m = old
			}
		}
		if m == nil {
			m = n.desirePeer(p, direct)
		}
		memos.set(m)
		for _, e := range m.errs {
			failed.Add(i, e)
		}
	}
	return memos
}

// unchanged reports whether book already is what desire would build for
// peers: the same peers in the same order, none of them changed or with
// an error (a peer with one is computed again).
func (n *Network) unchanged(book memoBook, peers []lease.Lease, direct func(netip.Addr) bool) bool {
	if len(peers) != len(book.order) {
		return false
	}
	for i, p := range peers {
		m := book.order[i]
		if m.stale || len(m.errs) > 0 || !m.same(p) || m.direct != n.directBits(p, direct) {
			return false
		}
	}
	return true
}

// entries calls f with the entries of kind k on link that the peers of b
// ask for, in order, as sets tagged with each peer's index.
func (b memoBook) entries(k kind, link int, f func(op)) {
	for i, m := range b.order {
		m.each(i, func(o op) {
			if o.kind == k && o.link == link {
				f(o)
			}
		})
	}
}

// chunks calls f with the entries of kind k on link, in slices of at most
// size entries (one backing array, reused: f must not keep it), and stops
// at f's first error.
func (b memoBook) chunks(k kind, link, size int, f func([]op) error) error {
	var buf []op // allocated on the first entry: a link may have none
	var err error
	b.entries(k, link, func(o op) {
		if err != nil {
			return
		}
		if buf == nil {
			buf = make([]op, 0, min(size, len(b.order)))
		}
		if buf = append(buf, o); len(buf) == size {
			err, buf = f(buf), buf[:0]
		}
	})
	if err == nil && len(buf) > 0 {
		err = f(buf)
	}
	return err
}

// table returns the entries of kind k on link, all at once. One table at a
// time is built, diffed and programmed: at most one copy of one table is
// live.
func (b memoBook) table(k kind, link int) []op {
	var out []op
	b.entries(k, link, func(o op) {
		if out == nil {
			out = make([]op, 0, len(b.order))
		}
		out = append(out, o)
	})
	return out
}

// desirePeer computes the entries for a peer.
func (n *Network) desirePeer(p lease.Lease, direct func(netip.Addr) bool) *peerMemo {
	m := &peerMemo{key: keyOf(p), attrs: p.Attrs, direct: n.directBits(p, direct), proto: n.routeProto, table: n.routeTable}
	if p.Attrs.BackendType != Type {
		n.log.Debug("skipping peer of another backend", "subnet", p.String(), "backend_type", p.Attrs.BackendType)
		return m
	}
	if (p.Subnet.IsValid() && p.Subnet == n.own.Subnet) || (p.IPv6Subnet.IsValid() && p.IPv6Subnet == n.own.IPv6Subnet) {
		return m
	}
	for f, v6 := range []bool{false, true} {
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
			m.fam[f] = famMemo{mode: famDirect, link: int32(n.env.Iface.Index)}
			continue
		}
		bd, err := ParseBackendData(data)
		if err != nil {
			m.errs = append(m.errs, fmt.Errorf("subnet %s: %w", subnet, err))
			continue
		}
		m.fam[f] = famMemo{mode: famOverlay, mac: [6]byte(bd.VtepMAC), link: int32(d.index)}
	}
	return m
}

func hasKey[K comparable, V any](m map[K]V, k K) bool {
	_, ok := m[k]
	return ok
}

// diffNeigh returns the sets for desired entries that are missing or
// differ, and deletes for permanent actual entries nobody wants. Entries
// are keyed by (link, ip) for neighbours and (link, mac, ip) for FDB
// entries. It has no side effects.
func diffNeigh(k kind, want []op, actual []netlink.Neigh) (set, del []op) {
	d := newNeighDiff(k, want)
	for _, a := range actual {
		d.see(a)
	}
	return d.result()
}

// neighDiff is diffNeigh over a dump as it is read: it is indexed by the
// desired entries, not the actual ones, so that the steady state (every
// entry in place) keeps no copy of the kernel's table.
type neighDiff struct {
	k     kind
	build func() []op // want, built on the first permanent entry seen
	want  []op
	idx   map[neighKey]int // the first desired entry per key
	done  []bool           // the desired entry is in place
	del   []op
}

type neighKey struct {
	link int
	ip   netip.Addr
	mac  [6]byte // FDB only; a vxlan device's MACs are Ethernet's
	long string  // FDB only: a MAC of another length, as it is
}

func newNeighDiff(k kind, want []op) *neighDiff {
	return &neighDiff{k: k, build: func() []op { return want }}
}

// newLazyNeighDiff is a neighDiff whose desired entries are built only if
// the dump has a permanent entry: see none.
func newLazyNeighDiff(k kind, build func() []op) *neighDiff { return &neighDiff{k: k, build: build} }

// none reports whether the dump had no permanent entry: every desired
// entry is a set, and want was not built.
func (d *neighDiff) none() bool { return d.idx == nil }

// index builds idx and done on the first permanent entry seen: a table
// with none (the start-up case) costs nothing.
func (d *neighDiff) index() {
	if d.idx != nil {
		return
	}
	d.want = d.build()
	d.idx, d.done = make(map[neighKey]int, len(d.want)), make([]bool, len(d.want))
	for i, w := range d.want {
		if kk := d.key(w.link, w.ip, w.mac); !hasKey(d.idx, kk) {
			d.idx[kk] = i
		}
	}
}

func (d *neighDiff) key(link int, ip netip.Addr, mac net.HardwareAddr) neighKey {
	kk := neighKey{link: link, ip: ip}
	if d.k == kindFDB {
		if len(mac) == 6 {
			kk.mac = [6]byte(mac)
		} else {
			kk.long = string(mac)
		}
	}
	return kk
}

// reset forgets what the entries seen so far said (a dump that is read
// again).
func (d *neighDiff) reset() {
	clear(d.done)
	d.del = d.del[:0]
}

// see compares one actual entry (whose slices it does not keep).
func (d *neighDiff) see(a netlink.Neigh) {
	if a.State&netlink.NUD_PERMANENT == 0 {
		return
	}
	d.index()
	ip := ipconv.AddrFromIP(a.IP)
	i, ok := d.idx[d.key(a.LinkIndex, ip, a.HardwareAddr)]
	switch {
	case !ok:
		d.del = append(d.del, op{kind: d.k, del: true, link: a.LinkIndex, ip: ip, mac: slices.Clone(a.HardwareAddr), peer: -1})
	case sameMAC(a.HardwareAddr, d.want[i].mac):
		d.done[i] = true
	}
}

// result is the sets and deletes for what was seen.
func (d *neighDiff) result() (set, del []op) {
	if d.idx == nil {
		return d.build(), nil // nothing programmed yet: the common bulk case
	}
	if len(d.del) == 0 && !slices.Contains(d.done, true) {
		return d.want, nil
	}
	for _, w := range d.want {
		if j := d.idx[d.key(w.link, w.ip, w.mac)]; !d.done[j] || !sameMAC(d.want[j].mac, w.mac) {
			set = append(set, w)
		}
	}
	del = d.del
	slices.SortFunc(del, func(a, b op) int { return a.ip.Compare(b.ip) })
	return set, del
}
