package etcdstore

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flannelkit/flannel/lease"
)

// entry is one key under <prefix>/subnets/ as Acquire sees it.
type entry struct {
	key     string
	l       lease.Lease // subnets always; attributes only when ok
	ok      bool        // the value parsed
	modRev  int64
	leaseID clientv3.LeaseID // NoLease: a reservation
}

func (e entry) reservation() bool { return e.leaseID == clientv3.NoLease }

// errRace means a compare-and-swap lost against another writer.
var errRace = errors.New("lost a race with another writer")

// errRelist asks Acquire to list again after reclaim deleted keys.
var errRelist = errors.New("own keys deleted; list again")

// Acquire returns this node's lease, the node being identified by
// req.Attrs.PublicIP (PublicIPv6 when it has no IPv4 address). In order:
//
//   - a reservation (a key without an etcd lease) with the node's public IP,
//     with its attributes updated and no TTL;
//   - the node's own lease, found by public IP, when it still fits the
//     network config: its attributes are updated and it gets a fresh TTL;
//     an own lease that no longer fits is deleted;
//   - req.Previous when it fits and nobody holds it;
//   - a random free subnet.
//
// New keys are created with a compare-and-swap (the key must not exist) and
// an etcd lease of the store's TTL; a lost race retries with a fresh view,
// up to Options.MaxAttempts times. Reservations of other nodes are never
// taken. A full network yields an error wrapping lease.ErrNoFreeSubnet.
// Values that do not parse are skipped with a warning naming the key, but
// their subnets count as taken. Acquire may be called again after an error.
func (s *Store) Acquire(ctx context.Context, req lease.Request) (lease.Lease, error) {
	cfg, err := s.Config(ctx)
	if err != nil {
		return lease.Lease{}, err
	}
	id := identity(req.Attrs)
	if !id.IsValid() {
		return lease.Lease{}, errors.New("acquire lease: request has no public IP to identify the node")
	}
	value, err := json.Marshal(req.Attrs)
	if err != nil {
		return lease.Lease{}, fmt.Errorf("acquire lease for %s: encode attributes: %w", id, err)
	}

	// One etcd lease serves every attempt; it is revoked if unused.
	grant := clientv3.NoLease
	used := false
	defer func() {
		if !used {
			s.revoke(ctx, grant)
		}
	}()
	ensureGrant := func() (clientv3.LeaseID, error) {
		if grant == clientv3.NoLease {
			g, err := s.grant(ctx)
			if err != nil {
				return clientv3.NoLease, fmt.Errorf("acquire lease for %s: %w", id, err)
			}
			grant = g
		}
		return grant, nil
	}

	for attempt := 1; ; attempt++ {
		if attempt > s.maxAttempts {
			return lease.Lease{}, fmt.Errorf("acquire lease for %s: gave up after %d attempts: %w", id, s.maxAttempts, errRace)
		}
		entries, err := s.list(ctx)
		if err != nil {
			return lease.Lease{}, fmt.Errorf("acquire lease for %s: %w", id, err)
		}

		l, usedGrant, err := s.reclaim(ctx, cfg, req, entries, value, ensureGrant)
		if errors.Is(err, errRace) {
			s.log.Debug("own lease changed while reclaiming it; retrying", "public_ip", id, "attempt", attempt)
			continue
		}
		if errors.Is(err, errRelist) {
			// Stale own keys were deleted: their subnets may be free now.
			continue
		}
		if err != nil {
			return lease.Lease{}, fmt.Errorf("acquire lease for %s: %w", id, err)
		}
		if l.Subnet.IsValid() || l.IPv6Subnet.IsValid() {
			used = usedGrant
			return l, nil
		}

		// Nothing of ours: allocate, honouring Previous when free.
		taken := make([]lease.Lease, 0, len(entries))
		for _, e := range entries {
			taken = append(taken, e.l)
		}
		s.rngMu.Lock()
		got, err := cfg.Allocate(taken, req.Previous, s.rng)
		s.rngMu.Unlock()
		if err != nil {
			return lease.Lease{}, fmt.Errorf("acquire lease for %s under %s: %w", id, s.prefix, err)
		}
		g, err := ensureGrant()
		if err != nil {
			return lease.Lease{}, err
		}
		key := s.LeaseKey(got)
		rctx, cancel := s.reqCtx(ctx)
		txn, err := s.client.Txn(rctx).
			If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
			Then(clientv3.OpPut(key, string(value), clientv3.WithLease(g))).Commit()
		cancel()
		if err != nil {
			return lease.Lease{}, fmt.Errorf("acquire lease for %s: create %s: %w", id, key, err)
		}
		if !txn.Succeeded {
			s.log.Debug("subnet taken concurrently; retrying with another", "key", key, "attempt", attempt)
			continue
		}
		used = true
		got.Attrs = req.Attrs
		got.Expiration = s.now().Add(s.ttl)
		how := "new subnet"
		if got.SameSubnets(req.Previous) {
			how = "previous subnet"
		}
		s.log.Info("lease acquired", "key", key, "public_ip", id, "how", how)
		return got, nil
	}
}

// reclaim looks for the node's own keys. It returns the reclaimed lease, or
// a zero lease when the node has none that fits; own keys that do not fit
// the config (and duplicates) are deleted, reservations never.
func (s *Store) reclaim(ctx context.Context, cfg lease.Config, req lease.Request, entries []entry, value []byte,
	ensureGrant func() (clientv3.LeaseID, error)) (lease.Lease, bool, error) {
	own := ownEntries(req.Attrs, req.Previous, entries)
	if len(own) == 0 {
		return lease.Lease{}, false, nil
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
				return lease.Lease{}, false, derr
			}
			deleted = true
			s.log.Info("deleted own lease", "key", e.key, "reason", why)
		}
	}
	if chosen == nil {
		if deleted {
			return lease.Lease{}, false, errRelist
		}
		return lease.Lease{}, false, nil
	}

	put := clientv3.OpPut(chosen.key, string(value))
	usedGrant := false
	if !chosen.reservation() {
		g, err := ensureGrant()
		if err != nil {
			return lease.Lease{}, false, err
		}
		put = clientv3.OpPut(chosen.key, string(value), clientv3.WithLease(g))
		usedGrant = true
	}
	rctx, cancel := s.reqCtx(ctx)
	defer cancel()
	txn, err := s.client.Txn(rctx).
		If(clientv3.Compare(clientv3.ModRevision(chosen.key), "=", chosen.modRev)).
		Then(put).Commit()
	if err != nil {
		return lease.Lease{}, false, fmt.Errorf("update %s: %w", chosen.key, err)
	}
	if !txn.Succeeded {
		return lease.Lease{}, false, errRace
	}
	l := lease.Lease{Subnet: chosen.l.Subnet, IPv6Subnet: chosen.l.IPv6Subnet, Attrs: req.Attrs}
	if chosen.reservation() {
		s.log.Info("using reservation", "key", chosen.key, "public_ip", identity(req.Attrs))
		return l, false, nil
	}
	// The key moved to the new etcd lease; the old one holds nothing now.
	s.revoke(ctx, chosen.leaseID)
	l.Expiration = s.now().Add(s.ttl)
	s.log.Info("lease reclaimed", "key", chosen.key, "public_ip", identity(req.Attrs))
	return l, usedGrant, nil
}

// ownEntries returns the entries the node with attrs published (same
// identifying public IP), in the order Acquire prefers them: reservations
// first, then the previous subnets, then by key.
func ownEntries(attrs lease.Attrs, previous lease.Lease, entries []entry) []entry {
	var own []entry
	for _, e := range entries {
		if e.ok && sameNode(attrs, e.l.Attrs) {
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
// zero.
func (s *Store) FindOwn(ctx context.Context, attrs lease.Attrs) (lease.Lease, bool, error) {
	id := identity(attrs)
	if !id.IsValid() {
		return lease.Lease{}, false, nil
	}
	cfg, err := s.Config(ctx)
	if err != nil {
		return lease.Lease{}, false, fmt.Errorf("find lease of %s: %w", id, err)
	}
	entries, err := s.list(ctx)
	if err != nil {
		return lease.Lease{}, false, fmt.Errorf("find lease of %s: %w", id, err)
	}
	for _, e := range ownEntries(attrs, lease.Lease{}, entries) {
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

// list reads every key under <prefix>/subnets/. Keys that do not parse are
// skipped with a warning; keys whose value does not parse are returned
// with ok false (their subnets are still taken).
func (s *Store) list(ctx context.Context) ([]entry, error) {
	rctx, cancel := s.reqCtx(ctx)
	defer cancel()
	resp, err := s.client.Get(rctx, s.subnetsKey, clientv3.WithPrefix())
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", s.subnetsKey, err)
	}
	out := make([]entry, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		e, ok := s.entryOf(kv)
		if ok {
			out = append(out, e)
		}
	}
	return out, nil
}

func (s *Store) entryOf(kv *mvccpb.KeyValue) (entry, bool) {
	l, err := s.parse(kv.Key, kv.Value)
	e := entry{key: string(kv.Key), l: l, ok: err == nil, modRev: kv.ModRevision, leaseID: clientv3.LeaseID(kv.Lease)}
	if err != nil {
		if !l.Subnet.IsValid() && !l.IPv6Subnet.IsValid() {
			s.log.Warn("skipping malformed lease key", "key", string(kv.Key), "error", err)
			return entry{}, false
		}
		s.log.Warn("skipping malformed lease value; its subnet stays taken", "key", string(kv.Key), "error", err)
		e.l.Attrs = lease.Attrs{}
	}
	return e, true
}
