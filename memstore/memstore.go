// Package memstore is an in-memory lease store: several agents in one
// process (tests, the demo) share one *Store as their flannel.LeaseStore.
//
// It follows the same rules as the real stores (race-free allocation,
// reclaim by public IP, previous subnet honoured, optional expiry), but it
// is not persistent and not shared between processes; it is not meant for
// production clusters.
package memstore

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
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

// Store is an in-memory lease store, safe for concurrent use. Create it with
// New.
type Store struct {
	cfg   lease.Config
	ttl   time.Duration
	renew time.Duration
	now   func() time.Time
	log   *slog.Logger

	mu     sync.Mutex
	leases map[string]lease.Lease // by lease.Key()
	// changed is closed and replaced on every change: a broadcast that
	// Watch and Keep wait on without holding mu.
	changed chan struct{}
}

// New returns an empty store serving network cfg (as returned by
// lease.ParseConfig).
func New(cfg lease.Config, opts Options) *Store {
	s := &Store{
		cfg:     cfg,
		ttl:     opts.TTL,
		renew:   opts.RenewInterval,
		now:     opts.Now,
		log:     opts.Logger,
		leases:  map[string]lease.Lease{},
		changed: make(chan struct{}),
	}
	if s.now == nil {
		s.now = time.Now
	}
	if s.renew <= 0 {
		s.renew = max(s.ttl/3, time.Millisecond)
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	return s
}

// Config returns the network configuration the store was created with.
func (s *Store) Config(ctx context.Context) (lease.Config, error) {
	if err := ctx.Err(); err != nil {
		return lease.Config{}, err
	}
	return s.cfg, nil
}

// Acquire returns a lease for the node identified by req.Attrs: the lease
// already published under its public IP (PublicIPv6 for an IPv6-only
// network) when it still fits the network, with its attributes updated;
// else req.Previous when it fits and is free; else a free subnet. Allocation
// happens under the store's lock, so concurrent calls never receive the
// same subnet. A full network yields an error wrapping lease.ErrNoFreeSubnet.
func (s *Store) Acquire(ctx context.Context, req lease.Request) (lease.Lease, error) {
	if err := ctx.Err(); err != nil {
		return lease.Lease{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	changed := s.pruneLocked()
	defer func() {
		if changed {
			s.notifyLocked()
		}
	}()

	// Reclaim our own lease by public IP.
	if key, old, ok := s.findByIdentityLocked(req.Attrs); ok {
		err := s.cfg.CheckLease(old)
		if err == nil {
			l := s.stamp(lease.Lease{Subnet: old.Subnet, IPv6Subnet: old.IPv6Subnet, Attrs: cloneAttrs(req.Attrs)})
			s.leases[key] = l
			changed = true
			s.log.Info("lease reclaimed", "lease", l, "public_ip", identity(req.Attrs))
			return cloneLease(l), nil
		}
		delete(s.leases, key)
		changed = true
		s.log.Warn("dropped own lease that no longer fits the network", "lease", old, "error", err)
	}

	// The previous subnets, when valid and free.
	if prev := req.Previous; prev.Subnet.IsValid() || prev.IPv6Subnet.IsValid() {
		prev = lease.Lease{Subnet: prev.Subnet.Masked(), IPv6Subnet: prev.IPv6Subnet.Masked()}
		if err := s.cfg.CheckLease(prev); err != nil {
			s.log.Info("previous subnet does not fit the network", "lease", prev, "error", err)
		} else if holder, taken := s.overlapLocked(prev); taken {
			s.log.Info("previous subnet is taken", "lease", prev, "holder", holder)
		} else {
			l := s.stamp(lease.Lease{Subnet: prev.Subnet, IPv6Subnet: prev.IPv6Subnet, Attrs: cloneAttrs(req.Attrs)})
			s.leases[l.Key()] = l
			changed = true
			s.log.Info("lease acquired (previous subnet)", "lease", l, "public_ip", identity(req.Attrs))
			return cloneLease(l), nil
		}
	}

	taken := make([]lease.Lease, 0, len(s.leases))
	for _, l := range s.leases {
		taken = append(taken, l)
	}
	got, err := s.cfg.Allocate(taken, lease.Lease{}, nil)
	if err != nil {
		return lease.Lease{}, fmt.Errorf("allocate subnet for %s: %w", identity(req.Attrs), err)
	}
	if holder, dup := s.overlapLocked(got); dup {
		// Defence in depth: the allocator must never hand out a held subnet.
		return lease.Lease{}, fmt.Errorf("allocate subnet for %s: allocator returned %s held by %s", identity(req.Attrs), got, holder)
	}
	l := s.stamp(lease.Lease{Subnet: got.Subnet, IPv6Subnet: got.IPv6Subnet, Attrs: cloneAttrs(req.Attrs)})
	s.leases[l.Key()] = l
	changed = true
	s.log.Info("lease acquired", "lease", l, "public_ip", identity(req.Attrs))
	return cloneLease(l), nil
}

// FindOwn returns the unexpired lease published under the node's public IP
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

// Keep holds own until ctx ends, renewing it (when the store has a TTL)
// every RenewInterval. It returns nil when ctx ends, and an error
// wrapping lease.ErrLeaseLost as soon as the lease expired, was removed or
// is held by another node.
func (s *Store) Keep(ctx context.Context, own lease.Lease) error {
	key := own.Key()
	var renew <-chan time.Time
	var ticker *time.Ticker
	if s.ttl > 0 {
		ticker = time.NewTicker(s.renew)
		defer ticker.Stop()
		renew = ticker.C
	}
	for {
		s.mu.Lock()
		if s.pruneLocked() {
			s.notifyLocked()
		}
		cur, ok := s.leases[key]
		if !ok || !sameOwner(cur.Attrs, own.Attrs) {
			s.mu.Unlock()
			return fmt.Errorf("keep lease %s: %w", own, lease.ErrLeaseLost)
		}
		changed := s.changed
		s.mu.Unlock()

		select {
		case <-ctx.Done():
			return nil
		case <-changed:
		case <-renew:
			s.mu.Lock()
			if cur, ok := s.leases[key]; ok && sameOwner(cur.Attrs, own.Attrs) && !s.expired(cur) {
				cur = s.stamp(cur)
				s.leases[key] = cur
				// Expiration changed: watchers see the new value.
				s.notifyLocked()
			}
			s.mu.Unlock()
		}
	}
}

// Watch calls fn with the full set of leases: first (Resync true), then
// after every change, until ctx ends; it then returns nil. fn runs on the
// caller's goroutine without the store's lock held, so a slow fn delays
// only this watcher; changes that happen meanwhile are coalesced into the
// next snapshot (latest wins).
func (s *Store) Watch(ctx context.Context, fn func(lease.Snapshot)) error {
	resync := true
	for {
		s.mu.Lock()
		if s.pruneLocked() {
			s.notifyLocked()
		}
		snap := lease.Snapshot{Leases: s.listLocked(), Resync: resync}
		changed := s.changed
		next := s.nextExpiryLocked()
		s.mu.Unlock()
		resync = false

		if err := ctx.Err(); err != nil {
			return nil
		}
		fn(snap)

		// Expired leases vanish from the store lazily; wake up when the
		// next one is due so watchers see it go.
		var expire <-chan time.Time
		var timer *time.Timer
		if !next.IsZero() {
			timer = time.NewTimer(max(next.Sub(s.now()), 0) + time.Millisecond)
			expire = timer.C
		}
		select {
		case <-ctx.Done():
		case <-changed:
		case <-expire:
		}
		if timer != nil {
			timer.Stop()
		}
		if ctx.Err() != nil {
			return nil
		}
	}
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
	if cur, ok := s.leases[key]; ok && sameOwner(cur.Attrs, l.Attrs) {
		delete(s.leases, key)
		s.notifyLocked()
		s.log.Info("lease released", "lease", cur)
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
	for key, l := range s.leases {
		if (l.Subnet.IsValid() && l.Subnet == subnet) || (l.IPv6Subnet.IsValid() && l.IPv6Subnet == subnet) {
			delete(s.leases, key)
			s.notifyLocked()
			s.log.Info("lease removed", "lease", l)
			return true
		}
	}
	return false
}

// Leases returns the current leases, sorted by key.
func (s *Store) Leases() []lease.Lease {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.pruneLocked() {
		s.notifyLocked()
	}
	return s.listLocked()
}

// notifyLocked wakes every watcher and keeper.
func (s *Store) notifyLocked() {
	close(s.changed)
	s.changed = make(chan struct{})
}

func (s *Store) stamp(l lease.Lease) lease.Lease {
	l.Expiration = time.Time{}
	if s.ttl > 0 {
		l.Expiration = s.now().Add(s.ttl)
	}
	return l
}

func (s *Store) expired(l lease.Lease) bool {
	return !l.Expiration.IsZero() && !s.now().Before(l.Expiration)
}

// pruneLocked drops expired leases and reports whether it dropped any.
func (s *Store) pruneLocked() bool {
	if s.ttl <= 0 {
		return false
	}
	pruned := false
	for key, l := range s.leases {
		if s.expired(l) {
			delete(s.leases, key)
			pruned = true
			s.log.Info("lease expired", "lease", l)
		}
	}
	return pruned
}

func (s *Store) nextExpiryLocked() time.Time {
	var next time.Time
	for _, l := range s.leases {
		if !l.Expiration.IsZero() && (next.IsZero() || l.Expiration.Before(next)) {
			next = l.Expiration
		}
	}
	return next
}

func (s *Store) listLocked() []lease.Lease {
	out := make([]lease.Lease, 0, len(s.leases))
	for _, l := range s.leases {
		out = append(out, cloneLease(l))
	}
	slices.SortFunc(out, func(a, b lease.Lease) int { return cmp.Compare(a.Key(), b.Key()) })
	return out
}

// findByIdentityLocked finds the lease published under the public IP that
// identifies the node: PublicIP when IPv4 is enabled and set, else
// PublicIPv6.
func (s *Store) findByIdentityLocked(a lease.Attrs) (string, lease.Lease, bool) {
	match := func(l lease.Lease) bool { return false }
	switch {
	case s.cfg.EnableIPv4 && a.PublicIP.IsValid():
		match = func(l lease.Lease) bool { return l.Attrs.PublicIP == a.PublicIP }
	case a.PublicIPv6.IsValid():
		match = func(l lease.Lease) bool { return l.Attrs.PublicIPv6 == a.PublicIPv6 }
	case a.PublicIP.IsValid():
		match = func(l lease.Lease) bool { return l.Attrs.PublicIP == a.PublicIP }
	}
	for key, l := range s.leases {
		if match(l) {
			return key, l, true
		}
	}
	return "", lease.Lease{}, false
}

// overlapLocked reports a held lease sharing a subnet with l.
func (s *Store) overlapLocked(l lease.Lease) (lease.Lease, bool) {
	for _, h := range s.leases {
		if (l.Subnet.IsValid() && h.Subnet.IsValid() && l.Subnet.Overlaps(h.Subnet)) ||
			(l.IPv6Subnet.IsValid() && h.IPv6Subnet.IsValid() && l.IPv6Subnet.Overlaps(h.IPv6Subnet)) {
			return h, true
		}
	}
	return lease.Lease{}, false
}

// sameOwner reports whether two attribute sets belong to the same node: the
// same public addresses, or (for nodes without any) equal attributes.
func sameOwner(a, b lease.Attrs) bool {
	if a.PublicIP.IsValid() || a.PublicIPv6.IsValid() || b.PublicIP.IsValid() || b.PublicIPv6.IsValid() {
		return a.PublicIP == b.PublicIP && a.PublicIPv6 == b.PublicIPv6
	}
	return a.Equal(b)
}

func identity(a lease.Attrs) string {
	switch {
	case a.PublicIP.IsValid() && a.PublicIPv6.IsValid():
		return a.PublicIP.String() + "," + a.PublicIPv6.String()
	case a.PublicIPv6.IsValid():
		return a.PublicIPv6.String()
	case a.PublicIP.IsValid():
		return a.PublicIP.String()
	default:
		return "node without public ip"
	}
}

func cloneLease(l lease.Lease) lease.Lease {
	l.Attrs = cloneAttrs(l.Attrs)
	return l
}

func cloneAttrs(a lease.Attrs) lease.Attrs {
	a.BackendData = cloneRaw(a.BackendData)
	a.BackendV6Data = cloneRaw(a.BackendV6Data)
	return a
}

func cloneRaw(b json.RawMessage) json.RawMessage {
	if b == nil {
		return nil
	}
	return append(json.RawMessage(nil), b...)
}
