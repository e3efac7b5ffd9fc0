package vxlan

import (
	"bytes"
	"cmp"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"golang.org/x/sys/unix"
)

// A full repair of a kernel that already holds every entry (the periodic
// resync, and the two tables a repair triggered by one deleted route did
// not lose) must not cost what a diff does: decoding a dump of 5,000 peers
// into netlink's types allocates about 4 MB per table, and the copy of the
// desired table and its map another megabyte, which is what raised the
// daemon's peak memory every five minutes. check reads the dump through a
// raw socket into one reused buffer and looks each entry up in a sorted
// index of the memos: a table that is in place costs 4 bytes per peer.
// Whatever it cannot vouch for (a missing, extra or different entry, a
// duplicate, an interrupted dump) is left to the diff, which is exact.

// tableState is what check found in one table.
type tableState uint8

const (
	tableDiffers tableState = iota // something differs, or check cannot tell: diff it
	tableEmpty                     // no entry of ours at all: every desired entry is a set
	tableInPlace                   // exactly the entries the memos ask for
)

// entryKey is what a table's entries are looked up by: a neighbour's
// address, an FDB entry's public IP and MAC, a route's destination.
type entryKey struct {
	addr netip.Addr
	bits int     // routes: the destination's length
	mac  [6]byte // FDB entries
}

func (a entryKey) compare(b entryKey) int {
	if c := a.addr.Compare(b.addr); c != 0 {
		return c
	}
	if c := cmp.Compare(a.bits, b.bits); c != 0 {
		return c
	}
	return bytes.Compare(a.mac[:], b.mac[:])
}

// tableIndex is the desired entries of one table on one link, as slots
// (memo index × 2 + family) sorted by key.
type tableIndex struct {
	k     kind
	order []*peerMemo
	slots []int32
	seen  []bool // by position in slots
	found int    // entries seen and in place
}

func (x *tableIndex) memo(s int32) (*peerMemo, bool) { return x.order[s>>1], s&1 == 1 }

func (x *tableIndex) key(s int32) entryKey {
	m, v6 := x.memo(s)
	switch x.k {
	case kindFDB:
		return entryKey{addr: m.public(v6), mac: m.fam[s&1].mac}
	case kindNeigh:
		return entryKey{addr: m.subnet(v6).Addr()}
	}
	p := m.subnet(v6)
	return entryKey{addr: p.Addr(), bits: p.Bits()}
}

// newTableIndex indexes the entries of kind k on link that book asks for
// (a link is one family's device, or the external interface of both
// families' direct routes), in x's arrays: a resync of tables in place
// allocates no index. ok is false when two of them share a key: only the
// diff knows which one wins.
func newTableIndex(x *tableIndex, book memoBook, k kind, link int) (ok bool) {
	*x = tableIndex{k: k, order: book.order, slots: x.slots[:0], seen: x.seen[:0]}
	want := func(e *famMemo) bool {
		return int(e.link) == link && (e.mode == famOverlay || (k == kindRoute && e.mode == famDirect))
	}
	n := 0
	for _, m := range book.order {
		for f := range m.fam {
			if want(&m.fam[f]) {
				n++
			}
		}
	}
	x.slots = slices.Grow(x.slots, n)
	for i, m := range book.order {
		for f := range m.fam {
			if want(&m.fam[f]) {
				x.slots = append(x.slots, int32(2*i+f))
			}
		}
	}
	slices.SortFunc(x.slots, func(a, b int32) int { return x.key(a).compare(x.key(b)) })
	for i := 1; i < len(x.slots); i++ {
		if x.key(x.slots[i-1]) == x.key(x.slots[i]) {
			return false
		}
	}
	x.seen = slices.Grow(x.seen, len(x.slots))[:len(x.slots)]
	clear(x.seen)
	return true
}

// see looks up the actual entry with key k: it returns the slot that asks
// for it (marked seen), or false when none does or one already was.
func (x *tableIndex) see(k entryKey) (int32, bool) {
	i, ok := slices.BinarySearchFunc(x.slots, k, func(s int32, k entryKey) int { return x.key(s).compare(k) })
	if !ok || x.seen[i] {
		return 0, false
	}
	x.seen[i] = true
	return x.slots[i], true
}

// check reads table k of link (neighbour and FDB tables: of the device of
// family v6) and reports whether it holds exactly what book asks for.
// It needs a raw socket in the node namespace; without one it reports
// tableDiffers.
func (n *Network) check(book memoBook, k kind, link int, v6 bool) tableState {
	w := n.dumper()
	if w == nil || (k == kindRoute && n.rec.Adopt != nil) {
		return tableDiffers
	}
	family := uint8(unix.AF_INET)
	if v6 {
		family = unix.AF_INET6
	}
	var x *tableIndex // n.index, built on the first entry of ours: none at start-up
	ours, differs := false, false
	// see looks up an entry of ours with key; inPlace compares the rest
	// of it with the slot that asks for it.
	see := func(mine bool, key entryKey, inPlace func(s int32) bool) {
		if !mine || differs {
			return
		}
		ours = true
		if x == nil {
			if x = &n.index; !newTableIndex(x, book, k, link) {
				differs = true
				return
			}
		}
		s, ok := x.see(key)
		if differs = !ok || !inPlace(s); !differs {
			x.found++
		}
	}
	var err error
	if k == kindRoute {
		var req [unix.SizeofRtMsg]byte // every family
		err = w.dump(unix.RTM_GETROUTE, req[:], func(typ uint16, m []byte) {
			r, mine := n.parseRoute(typ, m, link)
			see(mine, r.key, func(s int32) bool { return routeInPlace(x, s, r) })
		})
	} else {
		if k == kindFDB {
			family = unix.AF_BRIDGE
		}
		req := neighDumpReq(family, link)
		err = w.dump(unix.RTM_GETNEIGH, req[:], func(typ uint16, m []byte) {
			e, mine := parseNeigh(typ, m, link, family)
			key := entryKey{addr: e.ip}
			if k == kindFDB {
				key.mac = e.mac
			}
			see(mine, key, func(s int32) bool {
				m, _ := x.memo(s)
				return e.mac6 && m.fam[s&1].mac == e.mac
			})
		})
	}
	if x != nil {
		x.order = nil // the index keeps its arrays, not the book
	}
	switch {
	case err != nil:
		if !errors.Is(err, errDumpInterrupted) {
			n.log.Debug("table check failed; diffing the dump", "err", err)
		}
		return tableDiffers
	case differs:
		return tableDiffers
	case !ours:
		return tableEmpty
	case x.found == len(x.slots):
		return tableInPlace
	}
	return tableDiffers
}

// dumper is the first raw writer (opened when there is none yet), or nil
// when none can be opened.
func (n *Network) dumper() *writer {
	ws, err := n.writers(1)
	if err != nil {
		return nil
	}
	return ws[0]
}

// routeInPlace reports whether actual route r is what slot s asks for, by
// the attributes backend.SameRoute compares.
func routeInPlace(x *tableIndex, s int32, r rawRoute) bool {
	m, v6 := x.memo(s)
	spec := m.spec(v6)
	// The metric is unset: IPv6 reads it as the kernel's default, 1024.
	if metric := r.priority; metric != 0 && (!v6 || metric != 1024) {
		return false
	}
	if r.gw != spec.gw || r.onlink != spec.onlink || r.mtu != 0 || r.scope != unix.RT_SCOPE_UNIVERSE ||
		r.typ != unix.RTN_UNICAST || r.proto != spec.proto {
		return false
	}
	return true
}

// rawRoute is the part of a dumped route check compares.
type rawRoute struct {
	key                 entryKey
	gw                  netip.Addr
	onlink, hasDst      bool
	scope, typ, proto   uint8
	priority, mtu, link uint32
}

// parseRoute decodes a dumped route; mine reports whether it is one the
// reconciler owns on link (its table and protocol, as
// backend.RouteReconciler.OwnedEach lists them: cloned routes are not).
// A route of ours that does not decode is reported as ours with no
// destination, which no desired route has.
func (n *Network) parseRoute(typ uint16, m []byte, link int) (r rawRoute, mine bool) {
	if typ != unix.RTM_NEWROUTE || len(m) < unix.SizeofRtMsg {
		return r, false
	}
	family, dstLen, table := m[0], int(m[1]), uint32(m[4])
	r.proto, r.scope, r.typ = m[5], m[6], m[7]
	flags := binary.NativeEndian.Uint32(m[8:12])
	if flags&unix.RTM_F_CLONED != 0 {
		return r, false
	}
	r.onlink = flags&unix.RTNH_F_ONLINK != 0
	bad := false
	eachAttr(m[unix.SizeofRtMsg:], func(t uint16, v []byte) {
		switch t {
		case unix.RTA_DST:
			if a, ok := addrOf(family, v); ok {
				r.key, r.hasDst = entryKey{addr: a, bits: dstLen}, true
			} else {
				bad = true
			}
		case unix.RTA_GATEWAY:
			r.gw, _ = addrOf(family, v)
		case unix.RTA_OIF:
			r.link = u32(v)
		case unix.RTA_PRIORITY:
			r.priority = u32(v)
		case unix.RTA_TABLE:
			table = u32(v)
		case unix.RTA_METRICS:
			eachAttr(v, func(t uint16, v []byte) {
				if t == unix.RTAX_MTU {
					r.mtu = u32(v)
				}
			}, &bad)
		}
	}, &bad)
	if table != uint32(n.routeTable) || r.proto != n.routeProto || int(r.link) != link {
		return r, false
	}
	if bad || !r.hasDst {
		r.key = entryKey{}
	}
	return r, true
}

// rawNeigh is the part of a dumped neighbour or FDB entry check compares.
type rawNeigh struct {
	ip   netip.Addr
	mac  [6]byte
	mac6 bool // the entry has a 6-byte link-layer address
}

// neighDumpReq is a neighbour dump request body for family on link.
func neighDumpReq(family uint8, link int) [unix.SizeofNdMsg]byte {
	var b [unix.SizeofNdMsg]byte
	b[0] = family
	binary.NativeEndian.PutUint32(b[4:], uint32(link))
	return b
}

// parseNeigh decodes a dumped entry; mine reports whether it is a
// permanent one of family on link (as the diff sees them). A permanent
// entry that does not decode is reported as mine with no address.
func parseNeigh(typ uint16, m []byte, link int, family uint8) (e rawNeigh, mine bool) {
	if typ != unix.RTM_NEWNEIGH || len(m) < unix.SizeofNdMsg {
		return e, false
	}
	state := binary.NativeEndian.Uint16(m[8:10])
	if m[0] != family || int(int32(binary.NativeEndian.Uint32(m[4:8]))) != link || state&unix.NUD_PERMANENT == 0 {
		return e, false
	}
	bad := false
	eachAttr(m[unix.SizeofNdMsg:], func(t uint16, v []byte) {
		switch t {
		case unix.NDA_DST:
			a, ok := addrOf(0, v)
			e.ip, bad = a, bad || !ok
		case unix.NDA_LLADDR:
			if e.mac6 = len(v) == 6; e.mac6 {
				e.mac = [6]byte(v)
			}
		}
	}, &bad)
	if bad {
		e = rawNeigh{}
	}
	return e, true
}

// addrOf is a 4- or 16-byte address (family, when not zero, says which).
func addrOf(family uint8, v []byte) (netip.Addr, bool) {
	a, ok := netip.AddrFromSlice(v)
	if !ok || (family == unix.AF_INET && !a.Is4()) || (family == unix.AF_INET6 && !a.Is6()) {
		return netip.Addr{}, false
	}
	return a, true
}

func u32(v []byte) uint32 {
	if len(v) < 4 {
		return 0
	}
	return binary.NativeEndian.Uint32(v)
}

// eachAttr calls f with each rtnetlink attribute of b (type without its
// flag bits); a truncated one sets *bad and ends the walk.
func eachAttr(b []byte, f func(typ uint16, v []byte), bad *bool) {
	for len(b) >= unix.SizeofRtAttr {
		l := int(binary.NativeEndian.Uint16(b))
		if l < unix.SizeofRtAttr || l > len(b) {
			*bad = true
			return
		}
		f(binary.NativeEndian.Uint16(b[2:])&^(unix.NLA_F_NESTED|unix.NLA_F_NET_BYTEORDER), b[unix.SizeofRtAttr:l])
		b = b[min(len(b), (l+unix.RTA_ALIGNTO-1)&^(unix.RTA_ALIGNTO-1)):]
	}
}

// errDumpInterrupted: the table changed while it was dumped.
var errDumpInterrupted = errors.New("netlink dump interrupted")

// dump sends a dump request of type typ with body req through w's socket
// and calls f with each message's type and body until the dump ends. The
// messages point into w's receive buffer: valid during the call only. A
// dump the kernel marks interrupted is read to its end and reported as
// errDumpInterrupted.
func (w *writer) dump(typ uint16, req []byte, f func(typ uint16, m []byte)) error {
	w.seq++
	seq := w.seq
	w.sbuf = w.sbuf[:0]
	w.sbuf = binary.NativeEndian.AppendUint32(w.sbuf, uint32(unix.NLMSG_HDRLEN+len(req)))
	w.sbuf = binary.NativeEndian.AppendUint16(w.sbuf, typ)
	w.sbuf = binary.NativeEndian.AppendUint16(w.sbuf, unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	w.sbuf = binary.NativeEndian.AppendUint32(w.sbuf, seq)
	w.sbuf = binary.NativeEndian.AppendUint32(w.sbuf, 0)
	w.sbuf = append(w.sbuf, req...)
	if err := unix.Sendto(w.fd, w.sbuf, 0, &unix.SockaddrNetlink{Family: unix.AF_NETLINK}); err != nil {
		w.broken = true
		return fmt.Errorf("netlink send: %w", err)
	}
	intr := false
	for {
		// Only the kernel (or a process with CAP_NET_ADMIN) can send to
		// this unicast socket; answers to an earlier request are skipped
		// by their sequence number.
		nr, err := unix.Read(w.fd, w.rbuf)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			w.broken = true
			return fmt.Errorf("netlink receive: %w", err)
		}
		for b := w.rbuf[:nr]; len(b) >= unix.NLMSG_HDRLEN; {
			l := int(binary.NativeEndian.Uint32(b))
			if l < unix.NLMSG_HDRLEN || l > len(b) {
				w.broken = true
				return fmt.Errorf("netlink receive: message of %d bytes in %d", l, len(b))
			}
			mt, flags, ms := binary.NativeEndian.Uint16(b[4:]), binary.NativeEndian.Uint16(b[6:]), binary.NativeEndian.Uint32(b[8:])
			m := b[unix.NLMSG_HDRLEN:l]
			b = b[min(len(b), (l+unix.NLMSG_ALIGNTO-1)&^(unix.NLMSG_ALIGNTO-1)):]
			if ms != seq {
				continue
			}
			intr = intr || flags&unix.NLM_F_DUMP_INTR != 0
			switch mt {
			case unix.NLMSG_DONE:
				if intr {
					return errDumpInterrupted
				}
				return nil
			case unix.NLMSG_ERROR:
				if len(m) >= 4 {
					if code := int32(binary.NativeEndian.Uint32(m)); code != 0 {
						return fmt.Errorf("netlink dump: %w", unix.Errno(-code))
					}
				}
				return nil
			default:
				f(mt, m)
			}
		}
	}
}
