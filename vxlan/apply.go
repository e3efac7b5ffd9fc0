package vxlan

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/lease"
)

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
	var failed backend.PeerErrs
	memos := n.desire(peers, n.directFunc(), &failed, n.memo)
	// Each table is compared as the kernel's dump is read: nothing of
	// what is in place already is kept. Its sets are programmed before
	// the next table is built (FDB, neighbours, then routes: make before
	// break); deletes wait until every set is in place.
	h := nlsafe.Wrap(n.env.Handle)
	if n.env.NS.IsOpen() {
		h = nlsafe.New(n.env.Handle, n.env.NS)
	}
	prog := progress{failed: &failed, kernelOK: true}
	write := func(ops []op) error { return n.write(ctx, &prog, ops) }
	var dels []op
	for _, d := range n.devs {
		family := netlink.FAMILY_V4
		if d.spec.v6 {
			family = netlink.FAMILY_V6
		}
		for _, t := range []struct {
			k      kind
			family int
		}{{kindFDB, unix.AF_BRIDGE}, {kindNeigh, family}} {
			dl, err := n.syncTable(memos, t.k, d.index, d.spec.v6, &prog, write, func() (sets, dels []op, none bool, err error) {
				diff := newLazyNeighDiff(t.k, func() []op { return memos.table(t.k, d.index) })
				if err := h.NeighListEach(d.index, t.family, diff.reset, diff.see); err != nil {
					return nil, nil, false, fmt.Errorf("device %s: %w", d.spec.name, err)
				}
				if diff.none() { // the start-up case: no copy of the table at all
					return nil, nil, true, nil
				}
				sets, dels = diff.result()
				return sets, dels, false, nil
			})
			if err != nil {
				return err
			}
			dels = append(dels, dl...)
		}
	}
	for _, link := range links {
		dl, err := n.syncTable(memos, kindRoute, link, false, &prog, write, func() ([]op, []op, bool, error) {
			return n.diffRoutes(link, func() []op { return memos.table(kindRoute, link) })
		})
		if err != nil {
			return err
		}
		dels = append(dels, dl...)
	}
	return n.finish(ctx, began, peers, &prog, dels, memos)
}

// syncTable brings table k of link to what memos ask for: nothing when
// check vouches for it, every set (in chunks) when it holds no entry of
// ours, else the sets diff finds (none: no entry of ours either). It
// writes the sets and returns the deletes, which wait for every table's
// sets.
func (n *Network) syncTable(memos memoBook, k kind, link int, v6 bool, prog *progress, write func([]op) error,
	diff func() (sets, dels []op, none bool, err error)) ([]op, error) {
	switch n.check(memos, k, link, v6) {
	case tableInPlace:
		prog.inPlace++
		return nil, nil
	case tableEmpty:
		return nil, memos.chunks(k, link, n.chunk, write)
	}
	sets, dels, none, err := diff()
	switch {
	case err != nil:
		return nil, err
	case none:
		return nil, memos.chunks(k, link, n.chunk, write)
	}
	return dels, write(sets)
}

// diffRoutes compares our routes on link with desired (route sets with
// their specs), as the kernel's dump is read: a route that is exactly a
// desired one is counted and dropped, so that the steady state (every
// route in place) keeps no copy of the kernel's table. Desired routes that
// no route of their destination matched and the routes that matched none
// go through backend.DiffRoutes: a desired route with no route of its
// destination at all is added as it is (DiffRoutes copies every route it
// is given several times, slow with thousands of peers).
func (n *Network) diffRoutes(link int, build func() []op) (sets, dels []op, none bool, err error) {
	// Built and indexed on the first route of ours seen: a link with none
	// (the start-up case) costs nothing, and its sets are left to the
	// caller (none).
	var desired []op
	var first map[netip.Prefix]int // the first desired route per destination
	var matched []bool
	index := func() {
		if first != nil {
			return
		}
		desired = build()
		first = make(map[netip.Prefix]int, len(desired))
		for i := range desired {
			if dst := desired[i].memo.subnet(desired[i].v6); !hasKey(first, dst) {
				first[dst] = i
			}
		}
		matched = make([]bool, len(desired))
	}
	var rest []netlink.Route // actual routes that are no desired route
	err = n.rec.OwnedEach(n.env.Handle, link, func() {
		clear(matched)
		rest = rest[:0]
	}, func(a netlink.Route) {
		index()
		if dst, ok := ipconv.PrefixFromIPNet(a.Dst); ok {
			if i, ok := first[dst]; ok && !matched[i] {
				s := desired[i].memo.spec(desired[i].v6)
				if backend.SameRoute(s.attrs(ipconv.IPFromAddr(s.gw)), a) {
					matched[i] = true
					return
				}
			}
		}
		rest = append(rest, a)
	})
	if err != nil {
		return nil, nil, false, err
	}
	if first == nil { // no route of ours on link: every desired one is added
		return nil, nil, true, nil
	}
	other := make(map[netip.Prefix]bool, len(rest)) // destinations of rest
	for _, a := range rest {
		if dst, ok := ipconv.PrefixFromIPNet(a.Dst); ok {
			other[dst] = true
		}
	}
	var overlap []netlink.Route
	overlapPeer := map[netip.Prefix]int{}
	for i, o := range desired {
		if matched[i] {
			continue
		}
		dst := o.memo.subnet(o.v6)
		if first[dst] != i { // a second desired route of one destination: DiffRoutes keeps the first
			continue
		}
		if !other[dst] {
			sets = append(sets, o)
			continue
		}
		overlap = append(overlap, n.route(o.memo.spec(o.v6)))
		overlapPeer[dst] = o.peer
	}
	add, del := backend.DiffRoutes(overlap, rest)
	for i := range add {
		dst, _ := ipconv.PrefixFromIPNet(add[i].Dst)
		sets = append(sets, op{kind: kindRoute, link: link, route: &add[i], peer: overlapPeer[dst]})
	}
	for i := range del {
		dels = append(dels, op{kind: kindRoute, del: true, link: link, route: &del[i], peer: -1})
	}
	return sets, dels, false, nil
}

// chunkOps is how many sets of a table applyAll builds at a time when the
// kernel has none of them yet (Network.chunk).
const chunkOps = 4096

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
	// The memo is updated in place (no map of every peer per change): a
	// peer seen in this call gets this generation; the others are gone.
	// If programming fails, synced stays false and the next Apply
	// rebuilds the memo from scratch (applyAll).
	n.gen++
	prev := n.memo.order
	order := n.spare[:0]
	if cap(order) < len(peers) {
		order = make([]*peerMemo, 0, len(peers)+len(peers)/8)
	}
	n.spare = nil
	book := memoBook{byKey: n.memo.byKey, order: order, stamp: n.memo.stamp}
	var sets, dels []op
	j := 0 // the next memo of prev to match
	for i, p := range peers {
		old, had := findMemo(n.memo, &j, keyOf(p))
		if had && old.attrs.Equal(p.Attrs) { // found by its key: the same lease
			old.gen = n.gen
			book.order = append(book.order, old)
			for _, e := range old.errs {
				failed.Add(i, e)
			}
			continue
		}
		m := n.desirePeer(p, direct)
		m.gen = n.gen
		book.set(m)
		for _, e := range m.errs {
			failed.Add(i, e)
		}
		if !had {
			old = &peerMemo{}
		}
		s, d := n.diffMemo(old, m, i)
		sets, dels = append(sets, s...), append(dels, d...)
	}
	// Every memo in the map was in prev: those not seen now are gone.
	for _, old := range prev {
		if old.gen != n.gen && !old.stale {
			_, d := n.diffMemo(old, &peerMemo{}, -1)
			dels = append(dels, d...)
			old.stale = true
			book.byKey.remove(old.key)
		}
	}
	prog := progress{failed: &failed, kernelOK: true}
	if err := n.write(ctx, &prog, sets); err != nil {
		return err
	}
	return n.finish(ctx, began, peers, &prog, dels, book)
}

// findMemo returns the memo book records for key k, looking first at
// book.order[*j] and the one after (the next peer of an unchanged order, or
// one that follows a peer that is gone), advancing *j past the one found;
// else it looks the key up.
func findMemo(book memoBook, j *int, k leaseKey) (*peerMemo, bool) {
	prev := book.order
	for step := range 2 {
		if i := *j + step; i < len(prev) && !prev[i].stale && prev[i].key == k {
			*j = i + 1
			return prev[i], true
		}
	}
	if book.byKey == nil {
		return nil, false
	}
	return book.byKey.get(k)
}

// diffMemo returns the changes that turn a peer's old entries into its new
// ones (sets tagged with peer).
func (n *Network) diffMemo(old, cur *peerMemo, peer int) (sets, dels []op) {
	for _, k := range []kind{kindFDB, kindNeigh} {
		s, d := diffNeigh(k, cur.ops(k, peer), asNeighs(old.ops(k, -1)))
		sets, dels = append(sets, s...), append(dels, d...)
	}
	add, del := backend.DiffRoutes(n.routes(cur.specs()), n.routes(old.specs()))
	for i := range add {
		sets = append(sets, op{kind: kindRoute, link: add[i].LinkIndex, route: &add[i], peer: peer})
	}
	for i := range del {
		dels = append(dels, op{kind: kindRoute, del: true, link: del[i].LinkIndex, route: &del[i], peer: -1})
	}
	return sets, dels
}

// progress is what the writes of one Apply did.
type progress struct {
	failed   *backend.PeerErrs // the peers' errors
	rest     []error           // errors of deletes (no peer's)
	kernelOK bool              // no kernel error
	inPlace  int               // tables check vouched for (applyAll)
	ops      int
	took     time.Duration
}

// write programs ops (unless ctx is done) and records their errors in p.
func (n *Network) write(ctx context.Context, p *progress, ops []op) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	start := time.Now()
	for i, e := range n.program(ops) {
		if e == nil {
			continue
		}
		p.kernelOK = false
		e = fmt.Errorf("%s: %w", ops[i], e)
		if peer := ops[i].peer; peer >= 0 {
			p.failed.Add(peer, e)
		} else {
			p.rest = append(p.rest, e)
		}
	}
	p.ops += len(ops)
	p.took += time.Since(start)
	return nil
}

// finish programs dels after the sets p records, records the peers'
// entries and whether the kernel is now known to match them, and returns
// the peers' errors.
func (n *Network) finish(ctx context.Context, began time.Time, peers []lease.Lease, p *progress, dels []op, memos memoBook) error {
	// Routes first, so no route points at a vanished neighbour.
	slices.SortStableFunc(dels, func(a, b op) int { return int(b.kind) - int(a.kind) })
	sets := p.ops
	if err := n.write(ctx, p, dels); err != nil {
		return err
	}
	n.log.Debug("programmed", "sets", sets, "deletes", len(dels), "tables_in_place", p.inPlace, "diff_took", time.Since(began)-p.took, "program_took", p.took)
	// Peers skipped for bad data have nothing in the kernel, as their memo
	// says; only kernel errors leave the state unknown.
	if old := n.memo.order; len(old) > 0 && (len(memos.order) == 0 || &old[0] != &memos.order[0]) {
		clear(old[:cap(old)]) // keeps no gone peer's memo alive
		n.spare = old[:0]
	}
	n.synced, n.memo = p.kernelOK, memos
	return errors.Join(append(p.failed.Errors(peers), p.rest...)...)
}

// asNeighs renders desired neighbour or FDB ops as a dump would show them.
func asNeighs(ops []op) []netlink.Neigh {
	out := make([]netlink.Neigh, len(ops))
	for i, o := range ops {
		out[i] = netlink.Neigh{LinkIndex: o.link, IP: ipconv.IPFromAddr(o.ip), HardwareAddr: o.mac, State: netlink.NUD_PERMANENT}
	}
	return out
}
