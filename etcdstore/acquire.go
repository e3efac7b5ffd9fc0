package etcdstore

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flannelkit/flannel/internal/retry"
	"github.com/flannelkit/flannel/lease"
)

// errRace means a compare-and-swap lost against another writer.
var errRace = errors.New("lost a race with another writer")

// raceRetryMin and raceRetryMax bound the pause after a lost race.
const (
	raceRetryMin = 4 * time.Millisecond
	raceRetryMax = 128 * time.Millisecond
)

// errRelist asks Acquire to list again after reclaim deleted keys.
var errRelist = errors.New("own keys deleted; list again")

// Acquire returns this node's lease, the node being identified by
// lease.Config.Identity of req.Attrs: PublicIP when the network has IPv4,
// else PublicIPv6 (a request without it is an error). In order:
//
//   - a reservation (a key without an etcd lease) with the node's public IP,
//     with its attributes updated and no TTL;
//   - the node's own lease, found by public IP, when it still fits the
//     network config: its attributes are updated and it gets a fresh TTL;
//     an own lease that no longer fits is deleted;
//   - req.Previous when it fits and nobody holds it;
//   - a random free subnet.
//
// New keys are created with a compare-and-swap (the key must not exist; in
// a dual-stack network also no key created since the listing, as a new key
// may share the IPv4 or the IPv6 subnet with another) and an etcd lease of
// the store's TTL; a lost race retries with a fresh view after a short
// jittered pause, up to Options.MaxAttempts times. Reservations of other nodes are never
// taken. A full network yields an error wrapping lease.ErrNoFreeSubnet.
// Only valid leases count as taken (lease.Config.Peers: a key such as
// 0.0.0.0-1 or 172.0.0.0-8 is ignored, with one warning per change); a key
// whose value does not parse is skipped with a warning naming it, but its
// subnets count as taken when they fit the network. Acquire may be called
// again after an error.
func (s *Store) Acquire(ctx context.Context, req lease.Request) (lease.Lease, error) {
	cfg, err := s.Config(ctx)
	if err != nil {
		return lease.Lease{}, err
	}
	id := cfg.Identity(req.Attrs)
	if !id.IsValid() {
		return lease.Lease{}, errors.New("acquire lease: request has no public IP to identify the node (PublicIP, or PublicIPv6 in an IPv6-only network)")
	}
	value, err := json.Marshal(req.Attrs)
	if err != nil {
		return lease.Lease{}, fmt.Errorf("acquire lease for %s: encode attributes: %w", id, err)
	}
	// One etcd lease serves every attempt; it is revoked if unused.
	g := &grantOnce{s: s, ctx: ctx, id: id}
	defer g.done()
	// Nodes starting together lose races to each other; a short jittered
	// pause keeps them from retrying in lockstep.
	pause := &retry.Backoff{Min: raceRetryMin, Max: raceRetryMax, Rand: s.randN}
	for attempt := 1; ; attempt++ {
		if attempt > s.maxAttempts {
			return lease.Lease{}, fmt.Errorf("acquire lease for %s: gave up after %d attempts: %w", id, s.maxAttempts, errRace)
		}
		l, err := s.attempt(ctx, cfg, req, id, value, g, attempt == 1)
		switch {
		case errors.Is(err, errRace):
			d := pause.Next()
			s.log.Debug("lost a race for a key; retrying", "public_ip", id, "attempt", attempt, "in", d, "error", err)
			if err := retry.Sleep(ctx, d); err != nil {
				return lease.Lease{}, fmt.Errorf("acquire lease for %s: %w", id, err)
			}
			continue
		case errors.Is(err, errRelist):
			// Stale own keys were deleted: their subnets may be free now.
			continue
		case err != nil:
			return lease.Lease{}, err
		}
		s.setOwn(l)
		return l, nil
	}
}

// attempt is one try of Acquire on a fresh listing (on the first, the one
// FindOwn kept, if any): reclaim, else create a key for Previous or a free
// subnet with a compare-and-swap.
func (s *Store) attempt(ctx context.Context, cfg lease.Config, req lease.Request, id netip.Addr, value []byte, g *grantOnce,
	first bool) (lease.Lease, error) {
	var entries []entry
	var rev int64
	ok := false
	if first {
		entries, rev, ok = s.takeFound()
	}
	if !ok {
		var err error
		if entries, rev, err = s.list(ctx); err != nil {
			return lease.Lease{}, fmt.Errorf("acquire lease for %s: %w", id, err)
		}
	}
	l, wrote, err := s.reclaim(ctx, cfg, req, entries, value, g)
	if errors.Is(err, errRace) || errors.Is(err, errRelist) {
		return lease.Lease{}, err
	}
	if err != nil {
		return lease.Lease{}, fmt.Errorf("acquire lease for %s: %w", id, err)
	}
	// From here on the keys are needed as candidates only: judged for
	// allocation, then kept for the next Watch. The entries are garbage
	// from here (their last use).
	cands, malformed := s.candidates(cfg, entries, req.Attrs)
	if l.Subnet.IsValid() || l.IPv6Subnet.IsValid() {
		s.prime(listing{cands: cands, malformed: malformed, rev: rev, wrote: wrote})
		return l, nil
	}

	// Nothing of ours: allocate among the valid leases, honouring Previous.
	taken := s.taken(cfg, cands, malformed, s.ownLease())
	s.rngMu.Lock()
	got, err := cfg.Allocate(taken, req.Previous, s.rng)
	s.rngMu.Unlock()
	if err != nil {
		return lease.Lease{}, fmt.Errorf("acquire lease for %s under %s: %w", id, s.prefix, err)
	}
	lid, err := g.get()
	if err != nil {
		return lease.Lease{}, err
	}
	key := s.LeaseKey(got)
	guards := []clientv3.Cmp{clientv3.Compare(clientv3.CreateRevision(key), "=", 0)}
	if cfg.EnableIPv4 && cfg.EnableIPv6 {
		// A dual-stack key names both subnets, so a key that does not exist
		// yet may still share one of them with a key created since the
		// listing (two nodes picking the same IPv6 subnet at random beside
		// different IPv4 ones). Require that no key under subnets/ was
		// created since: a range compare holds only if every key in the
		// range satisfies it. Updates and renewals of existing keys keep
		// their create revision and do not conflict.
		guards = append(guards, clientv3.Compare(clientv3.CreateRevision(s.subnetsKey), "<", rev+1).WithPrefix())
	}
	rctx, cancel := s.reqCtx(ctx)
	txn, err := s.client.Txn(rctx).
		If(guards...).
		Then(clientv3.OpPut(key, string(value), clientv3.WithLease(lid))).Commit()
	cancel()
	if err != nil {
		return lease.Lease{}, fmt.Errorf("acquire lease for %s: create %s: %w", id, key, err)
	}
	if !txn.Succeeded {
		return lease.Lease{}, fmt.Errorf("subnet %s, or a key sharing one of its subnets, created concurrently: %w", key, errRace)
	}
	g.used = true
	s.prime(listing{cands: cands, malformed: malformed, rev: rev, wrote: entry{key: key, l: lease.Lease{Subnet: got.Subnet, IPv6Subnet: got.IPv6Subnet, Attrs: req.Attrs},
		ok: true, modRev: txn.Header.Revision, createRev: txn.Header.Revision, leaseID: lid}})
	got.Attrs = req.Attrs
	got.Expiration = s.now().Add(s.ttl)
	how := "new subnet"
	if got.SameSubnets(req.Previous) {
		how = "previous subnet"
	}
	s.log.Info("lease acquired", "key", key, "public_ip", id, "how", how)
	return got, nil
}

// grantOnce grants one etcd lease for all attempts of an Acquire, when
// first needed, and revokes it at the end unless a key uses it.
type grantOnce struct {
	s    *Store
	ctx  context.Context
	id   netip.Addr
	lid  clientv3.LeaseID
	used bool
}

func (g *grantOnce) get() (clientv3.LeaseID, error) {
	if g.lid == clientv3.NoLease {
		lid, err := g.s.grant(g.ctx)
		if err != nil {
			return clientv3.NoLease, fmt.Errorf("acquire lease for %s: %w", g.id, err)
		}
		g.lid = lid
	}
	return g.lid, nil
}

func (g *grantOnce) done() {
	if !g.used {
		g.s.revoke(g.ctx, g.lid)
	}
}

// reclaim looks for the node's own keys. It returns the reclaimed lease
// and the key as it wrote it, or a zero lease when the node has none that
// fits; own keys that do not fit the config (and duplicates) are deleted,
// reservations never.
func (s *Store) reclaim(ctx context.Context, cfg lease.Config, req lease.Request, entries []entry, value []byte,
	g *grantOnce) (lease.Lease, entry, error) {
	own := ownEntries(cfg, req.Attrs, req.Previous, entries)
	if len(own) == 0 {
		return lease.Lease{}, entry{}, nil
	}
	var chosen *entry
	deleted := false
	for i := range own {
		e := &own[i]
		err := cfg.CheckLease(e.l)
		switch {
		case chosen == nil && err == nil:
			chosen = e
		case e.reservation():
			if err != nil {
				s.log.Warn("reservation does not fit the network config; ignoring it", "key", e.key, "error", err)
			}
		default:
			why := "duplicate of the reclaimed lease"
			if err != nil {
				why = err.Error()
			}
			if derr := s.deleteIfUnchanged(ctx, *e); derr != nil {
				return lease.Lease{}, entry{}, derr
			}
			deleted = true
			s.log.Info("deleted own lease", "key", e.key, "reason", why)
		}
	}
	if chosen == nil {
		if deleted {
			return lease.Lease{}, entry{}, errRelist
		}
		return lease.Lease{}, entry{}, nil
	}

	put := clientv3.OpPut(chosen.key, string(value))
	lid := clientv3.NoLease
	if !chosen.reservation() {
		var err error
		if lid, err = g.get(); err != nil {
			return lease.Lease{}, entry{}, err
		}
		put = clientv3.OpPut(chosen.key, string(value), clientv3.WithLease(lid))
	}
	rctx, cancel := s.reqCtx(ctx)
	defer cancel()
	txn, err := s.client.Txn(rctx).
		If(clientv3.Compare(clientv3.ModRevision(chosen.key), "=", chosen.modRev)).
		Then(put).Commit()
	if err != nil {
		return lease.Lease{}, entry{}, fmt.Errorf("update %s: %w", chosen.key, err)
	}
	if !txn.Succeeded {
		return lease.Lease{}, entry{}, fmt.Errorf("own key %s changed while reclaiming it: %w", chosen.key, errRace)
	}
	l := lease.Lease{Subnet: chosen.l.Subnet, IPv6Subnet: chosen.l.IPv6Subnet, Attrs: req.Attrs}
	wrote := entry{key: chosen.key, l: l, ok: true, modRev: txn.Header.Revision, createRev: chosen.createRev, leaseID: lid}
	if chosen.reservation() {
		s.log.Info("using reservation", "key", chosen.key, "public_ip", cfg.Identity(req.Attrs))
		return l, wrote, nil
	}
	g.used = true
	// The key moved to the new etcd lease; the old one holds nothing now.
	s.revoke(ctx, chosen.leaseID)
	l.Expiration = s.now().Add(s.ttl)
	s.log.Info("lease reclaimed", "key", chosen.key, "public_ip", cfg.Identity(req.Attrs))
	return l, wrote, nil
}

// ownEntries returns the entries the node with attrs published (same
// identifying public IP), in the order Acquire prefers them: reservations
// first, then the previous subnets, then by key.
func ownEntries(cfg lease.Config, attrs lease.Attrs, previous lease.Lease, entries []entry) []entry {
	var own []entry
	for _, e := range entries {
		if e.ok && cfg.SameNode(attrs, e.l.Attrs) {
			own = append(own, e)
		}
	}
	rank := func(e entry) int {
		switch {
		case e.reservation():
			return 0
		case e.l.SameSubnets(previous):
			return 1
		default:
			return 2
		}
	}
	slices.SortFunc(own, func(a, b entry) int {
		return cmp.Or(cmp.Compare(rank(a), rank(b)), cmp.Compare(a.key, b.key))
	})
	return own
}

// FindOwn returns the lease Acquire would reclaim for the node with attrs
// (found by its identifying public IP: the first own key that fits the
// network config, reservations first), with the attributes stored in it,
// and false when there is none. It changes nothing; Expiration is left
// zero. The next Acquire's first attempt starts from FindOwn's listing
// instead of listing every key again (a starting node calls both, a
// moment apart; not after foundMaxAge): a listing that went stale
// meanwhile only loses a compare-and-swap, and the retry lists afresh.
func (s *Store) FindOwn(ctx context.Context, attrs lease.Attrs) (lease.Lease, bool, error) {
	cfg, err := s.Config(ctx)
	if err != nil {
		return lease.Lease{}, false, fmt.Errorf("find own lease: %w", err)
	}
	id := cfg.Identity(attrs)
	if !id.IsValid() {
		return lease.Lease{}, false, nil
	}
	entries, rev, err := s.list(ctx)
	if err != nil {
		return lease.Lease{}, false, fmt.Errorf("find lease of %s: %w", id, err)
	}
	s.keepFound(entries, rev)
	for _, e := range ownEntries(cfg, attrs, lease.Lease{}, entries) {
		if cfg.CheckLease(e.l) == nil {
			return e.l, true, nil
		}
	}
	return lease.Lease{}, false, nil
}

// deleteIfUnchanged deletes e's key unless it changed since it was listed.
func (s *Store) deleteIfUnchanged(ctx context.Context, e entry) error {
	rctx, cancel := s.reqCtx(ctx)
	defer cancel()
	_, err := s.client.Txn(rctx).
		If(clientv3.Compare(clientv3.ModRevision(e.key), "=", e.modRev)).
		Then(clientv3.OpDelete(e.key)).Commit()
	if err != nil {
		return fmt.Errorf("delete %s: %w", e.key, err)
	}
	return nil
}

// prime keeps the listing a successful Acquire worked on, and the key it
// wrote, for the next Watch, which starts from them and follows the events
// after the listing's revision instead of listing every key again: a node
// starting lists once. The write is among those events and changes nothing
// then, so the first snapshot already has the node's lease and a second
// one does not follow for it.
func (s *Store) prime(l listing) { s.primed.put(l) }

// takePrimed returns the listing prime kept, once.
func (s *Store) takePrimed() (listing, bool) {
	p := s.primed.take()
	return p, p.rev != 0
}

// foundMaxAge bounds how old a listing FindOwn kept may be for Acquire to
// start from it: a starting node calls the two a moment apart (the
// backend's Prepare between them), and an older listing would widen the
// window in which, say, a reservation made meanwhile goes unseen.
const foundMaxAge = 10 * time.Second

// keepFound keeps FindOwn's listing for the next Acquire.
func (s *Store) keepFound(entries []entry, rev int64) {
	s.found.put(rawListing{entries: entries, rev: rev, at: s.now()})
}

// takeFound returns the listing keepFound kept, once, unless it is older
// than foundMaxAge.
func (s *Store) takeFound() ([]entry, int64, bool) {
	f := s.found.take()
	if f.rev == 0 || s.now().Sub(f.at) > foundMaxAge {
		return nil, 0, false
	}
	return f.entries, f.rev, true
}

// handoff holds one value from one call to the next that takes it.
type handoff[T any] struct {
	mu sync.Mutex
	v  T
}

func (h *handoff[T]) put(v T) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.v = v
}

// take returns the value put last and forgets it (the zero value if none).
func (h *handoff[T]) take() T {
	h.mu.Lock()
	defer h.mu.Unlock()
	v := h.v
	var zero T
	h.v = zero
	return v
}

// rawListing is every key under <prefix>/subnets/ at etcd revision rev,
// as list returns them, listed at at.
type rawListing struct {
	entries []entry
	rev     int64
	at      time.Time
}

// listing is every key under <prefix>/subnets/ at etcd revision rev, as
// candidates (see candidates) and malformed keys, and, when its key is set,
// the key Acquire wrote after it.
type listing struct {
	cands     []lease.Candidate
	malformed []lease.Ignored
	rev       int64
	wrote     entry
}

// list reads every key under <prefix>/subnets/, malformed ones included
// (ok false; judge warns about them), and the etcd revision it read at.
// It reads listPage keys per request, every page at the revision of the
// first: one consistent listing, without the whole range decoded at once
// beside the entries made from it (at 20,000 keys that was 10 MB more at
// the node's busiest moment). A revision compacted meanwhile starts it
// over.
func (s *Store) list(ctx context.Context) ([]entry, int64, error) {
	for try := 0; ; try++ {
		out, rev, err := s.listAt(ctx)
		if errors.Is(err, rpctypes.ErrCompacted) && try < 3 {
			continue
		}
		if err != nil {
			return nil, 0, fmt.Errorf("list %s: %w", s.subnetsKey, err)
		}
		return out, rev, nil
	}
}

func (s *Store) listAt(ctx context.Context) ([]entry, int64, error) {
	var out []entry
	var rev int64
	from, end := s.subnetsKey, clientv3.GetPrefixRangeEnd(s.subnetsKey)
	for {
		opts := []clientv3.OpOption{clientv3.WithRange(end), clientv3.WithLimit(int64(s.listPage))}
		if rev != 0 {
			opts = append(opts, clientv3.WithRev(rev))
		}
		rctx, cancel := s.reqCtx(ctx)
		resp, err := s.client.Get(rctx, from, opts...)
		cancel()
		if err != nil {
			return nil, 0, err
		}
		if rev == 0 {
			rev, out = resp.Header.Revision, make([]entry, 0, resp.Count)
		}
		for _, kv := range resp.Kvs {
			out = append(out, s.entryOf(kv))
		}
		if !resp.More || len(resp.Kvs) == 0 {
			return out, rev, nil
		}
		from = string(resp.Kvs[len(resp.Kvs)-1].Key) + "\x00"
		if s.afterPage != nil {
			s.afterPage()
		}
	}
}
