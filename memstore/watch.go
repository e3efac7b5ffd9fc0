package memstore

import (
	"context"
	"fmt"
	"time"

	"github.com/flannelkit/flannel/lease"
)

// Keep holds own until ctx ends, renewing it (when the store has a TTL)
// every RenewInterval. It returns nil when ctx ends, and an error
// wrapping lease.ErrLeaseLost as soon as the lease expired, was removed or
// is held by another node.
func (s *Store) Keep(ctx context.Context, own lease.Lease) error {
	key := own.Key()
	var renew <-chan time.Time
	if s.ttl > 0 {
		ticker := time.NewTicker(s.renew)
		defer ticker.Stop()
		renew = ticker.C
	}
	for {
		s.mu.Lock()
		if s.pruneLocked() {
			s.notifyLocked()
		}
		cur, ok := s.leases[key]
		if !ok || !sameOwner(cur.l, own) {
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
			if cur, ok := s.leases[key]; ok && sameOwner(cur.l, own) && !s.expired(cur.l) {
				cur.l = s.stamp(cur.l)
				s.leases[key] = cur
				// Expiration changed: watchers see the new value.
				s.notifyLocked()
			}
			s.mu.Unlock()
		}
	}
}

// Watch calls fn with the full set of valid leases (lease.Config.Peers;
// the ignored ones are warned about once per change): first (Resync true),
// then after every change, until ctx ends; it then returns nil. fn runs on
// the caller's goroutine without the store's lock held, so a slow fn
// delays only this watcher; changes that happen meanwhile are coalesced
// into the next snapshot (latest wins).
func (s *Store) Watch(ctx context.Context, fn func(lease.Snapshot)) error {
	resync := true
	for {
		own := s.ownLease()
		s.mu.Lock()
		if s.pruneLocked() {
			s.notifyLocked()
		}
		snap := lease.Snapshot{Leases: s.verdictLocked(own.Attrs, own, s.warn, s.log).Leases(), Resync: resync}
		for i := range snap.Leases {
			snap.Leases[i] = cloneLease(snap.Leases[i])
		}
		changed := s.changed
		next := s.nextExpiryLocked()
		s.mu.Unlock()
		resync = false

		if err := ctx.Err(); err != nil {
			return nil
		}
		fn(snap)
		if !s.wait(ctx, changed, next) {
			return nil
		}
	}
}

// wait waits for a change, for the next expiry (expired leases vanish
// lazily; waking up when one is due lets watchers see it go) or for ctx.
// It reports false when ctx ended.
func (s *Store) wait(ctx context.Context, changed <-chan struct{}, next time.Time) bool {
	var expire <-chan time.Time
	if !next.IsZero() {
		timer := time.NewTimer(max(next.Sub(s.now()), 0) + time.Millisecond)
		defer timer.Stop()
		expire = timer.C
	}
	select {
	case <-ctx.Done():
	case <-changed:
	case <-expire:
	}
	return ctx.Err() == nil
}
