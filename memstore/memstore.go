// Package memstore is an in-memory lease store: several agents in one
// process (tests, the demo) share one *Store as their flannel.LeaseStore,
// or take one handle each with Node.
//
// It follows the same rules as the real stores (race-free allocation,
// reclaim by public IP, previous subnet honoured, optional expiry, the
// valid-peer rule of lease.Config.Peers), but it is not persistent and not
// shared between processes; it is not meant for production clusters.
package memstore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync"
	"time"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
)

// Compile-time checks.
var (
	_ flannel.LeaseStore    = (*Store)(nil)
	_ flannel.LeaseReleaser = (*Store)(nil)
	_ flannel.LeaseFinder   = (*Store)(nil)
)

// Options configure a Store. The zero value is valid.
type Options struct {
	// TTL is how long a lease lives unless Keep renews it. Optional: 0 means
	// leases never expire.
	TTL time.Duration
	// RenewInterval is how often Keep renews a lease. Optional: TTL/3.
	RenewInterval time.Duration
	// Now returns the current time. Optional: time.Now.
	Now func() time.Time
	// Logger receives the store's logs. Optional: nil discards.
	Logger *slog.Logger
}

// Store is a handle on an in-memory lease store, safe for concurrent use.
// Create it with New; Node gives another handle on the same leases.
//
// A node is identified by lease.Config.Identity of its attributes:
// PublicIP when IPv4 is enabled, else PublicIPv6. The handle remembers the
// node of its last Acquire: Watch does not hand out another node's lease
// that claims that node's subnet (lease.RuleOwnSubnet).
type Store struct {
	*book

	ownMu sync.Mutex
	own   lease.Lease // the last lease Acquire returned through this handle
	warn  *lease.Warnings
	log   *slog.Logger
}

// New returns an empty store serving network cfg (as returned by
// lease.ParseConfig).
func New(cfg lease.Config, opts Options) *Store {
	b := &book{
		cfg:     cfg,
		ttl:     opts.TTL,
		renew:   opts.RenewInterval,
		now:     opts.Now,
		log:     opts.Logger,
		leases:  map[string]entry{},
		changed: make(chan struct{}),
	}
	if b.now == nil {
		b.now = time.Now
	}
	if b.renew <= 0 {
		b.renew = max(b.ttl/3, time.Millisecond)
	}
	if b.log == nil {
		b.log = slog.New(slog.DiscardHandler)
	}
	return &Store{book: b, warn: new(lease.Warnings), log: b.log}
}

// Node returns a new handle on the same leases for another node: it
// remembers its own node (see Store) and reports ignored leases by itself,
// to log (nil: the store's logger).
func (s *Store) Node(log *slog.Logger) *Store {
	if log == nil {
		log = s.book.log
	}
	return &Store{book: s.book, warn: new(lease.Warnings), log: log}
}

// Config returns the network configuration the store was created with.
func (s *Store) Config(ctx context.Context) (lease.Config, error) {
	if err := ctx.Err(); err != nil {
		return lease.Config{}, err
	}
	return s.cfg, nil
}

// Acquire returns a lease for the node identified by req.Attrs (see
// Store): the lease already published under its identity when it still
// fits the network, with its attributes updated; else req.Previous when it
// fits and is free; else a free subnet. Only valid leases (lease.Config.Peers)
// count as taken. Allocation happens under the store's lock, so concurrent
// calls never receive the same subnet. A full network yields an error
// wrapping lease.ErrNoFreeSubnet; a request without the identifying
// address is an error.
func (s *Store) Acquire(ctx context.Context, req lease.Request) (lease.Lease, error) {
	if err := ctx.Err(); err != nil {
		return lease.Lease{}, err
	}
	id := s.cfg.Identity(req.Attrs)
	if !id.IsValid() {
		return lease.Lease{}, errors.New("acquire lease: request has no public IP to identify the node")
	}
	s.mu.Lock()
	changed := s.pruneLocked()
	l, err := s.acquireLocked(req, id)
	if err == nil {
		changed = true
	}
	if changed {
		s.notifyLocked()
	}
	s.mu.Unlock()
	if err != nil {
		return lease.Lease{}, err
	}
	s.ownMu.Lock()
	s.own = l
	s.ownMu.Unlock()
	return cloneLease(l), nil
}

func (s *Store) acquireLocked(req lease.Request, id netip.Addr) (lease.Lease, error) {
	// Reclaim our own lease by public IP.
	if key, old, ok := s.findByIdentityLocked(req.Attrs); ok {
		err := s.cfg.CheckLease(old)
		if err == nil {
			l := s.putLocked(key, lease.Lease{Subnet: old.Subnet, IPv6Subnet: old.IPv6Subnet, Attrs: cloneAttrs(req.Attrs)})
			s.log.Info("lease reclaimed", "lease", l, "public_ip", id)
			return l, nil
		}
		delete(s.leases, key)
		s.log.Warn("dropped own lease that no longer fits the network", "lease", old, "error", err)
	}
	taken := s.verdictLocked(req.Attrs, s.ownLease(), s.warn, s.log).Taken()

	// The previous subnets, when valid and free.
	if prev := req.Previous; prev.Subnet.IsValid() || prev.IPv6Subnet.IsValid() {
		prev = lease.Lease{Subnet: prev.Subnet.Masked(), IPv6Subnet: prev.IPv6Subnet.Masked()}
		if err := s.cfg.CheckLease(prev); err != nil {
			s.log.Info("previous subnet does not fit the network", "lease", prev, "error", err)
		} else if holder, held := overlap(taken, prev); held {
			s.log.Info("previous subnet is taken", "lease", prev, "holder", holder)
		} else {
			l := s.putLocked(prev.Key(), lease.Lease{Subnet: prev.Subnet, IPv6Subnet: prev.IPv6Subnet, Attrs: cloneAttrs(req.Attrs)})
			s.log.Info("lease acquired (previous subnet)", "lease", l, "public_ip", id)
			return l, nil
		}
	}

	got, err := s.cfg.Allocate(taken, lease.Lease{}, nil)
	if err != nil {
		return lease.Lease{}, fmt.Errorf("allocate subnet for %s: %w", id, err)
	}
	if holder, dup := overlap(taken, got); dup {
		// Defence in depth: the allocator must never hand out a held subnet.
		return lease.Lease{}, fmt.Errorf("allocate subnet for %s: allocator returned %s held by %s", id, got, holder)
	}
	if _, exists := s.leases[got.Key()]; exists {
		// An ignored lease (e.g. an overlap loser) sits on the key.
		return lease.Lease{}, fmt.Errorf("allocate subnet for %s: key %s is held by an ignored lease", id, got.Key())
	}
	l := s.putLocked(got.Key(), lease.Lease{Subnet: got.Subnet, IPv6Subnet: got.IPv6Subnet, Attrs: cloneAttrs(req.Attrs)})
	s.log.Info("lease acquired", "lease", l, "public_ip", id)
	return l, nil
}

// ownLease returns the lease the last Acquire through this handle returned.
func (s *Store) ownLease() lease.Lease {
	s.ownMu.Lock()
	defer s.ownMu.Unlock()
	return s.own
}

// FindOwn returns the unexpired lease published under the node's identity
// (the one Acquire would reclaim), and false when there is none. It
// changes nothing.
func (s *Store) FindOwn(ctx context.Context, attrs lease.Attrs) (lease.Lease, bool, error) {
	if err := ctx.Err(); err != nil {
		return lease.Lease{}, false, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	_, l, ok := s.findByIdentityLocked(attrs)
	if !ok || s.expired(l) {
		return lease.Lease{}, false, nil
	}
	return cloneLease(l), true, nil
}

// Release deletes l when the store still holds it for the same node (a
// lease taken over by another node is left alone). It is safe to call
// repeatedly; releasing an absent lease is not an error.
func (s *Store) Release(ctx context.Context, l lease.Lease) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	key := l.Key()
	if cur, ok := s.leases[key]; ok && sameOwner(cur.l, l) {
		delete(s.leases, key)
		s.notifyLocked()
		s.log.Info("lease released", "lease", cur.l)
	}
	return nil
}

// Remove deletes the lease holding subnet (its IPv4 or IPv6 subnet), as if
// its node had vanished, and reports whether there was one. The node's Keep
// returns lease.ErrLeaseLost.
func (s *Store) Remove(subnet netip.Prefix) bool {
	subnet = subnet.Masked()
	s.mu.Lock()
	defer s.mu.Unlock()
	for key, e := range s.leases {
		if (e.l.Subnet.IsValid() && e.l.Subnet == subnet) || (e.l.IPv6Subnet.IsValid() && e.l.IPv6Subnet == subnet) {
			delete(s.leases, key)
			s.notifyLocked()
			s.log.Info("lease removed", "lease", e.l)
			return true
		}
	}
	return false
}

// Put writes l under l.Key() as it is, replacing what is there, the way
// another writer to a shared store might: nothing is checked, so tests can
// write hostile or overlapping leases. Expiration is kept as given (zero:
// never expires). Watchers are woken.
func (s *Store) Put(l lease.Lease) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.seq++
	s.leases[l.Key()] = entry{l: cloneLease(l), order: s.seq}
	s.notifyLocked()
}

// Leases returns every lease the store holds, valid or not, sorted by key.
func (s *Store) Leases() []lease.Lease {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pruneLocked() {
		s.notifyLocked()
	}
	return s.listLocked()
}
