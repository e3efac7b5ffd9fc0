package memstore

import (
	"cmp"
	"encoding/json"
	"log/slog"
	"slices"
	"sync"
	"time"

	"github.com/flannelkit/flannel/lease"
)

// book is the state every handle of one store shares.
type book struct {
	cfg   lease.Config
	ttl   time.Duration
	renew time.Duration
	now   func() time.Time
	log   *slog.Logger

	mu     sync.Mutex
	leases map[string]entry // by lease.Key()
	seq    int64            // insertion counter: entry.order
	// changed is closed and replaced on every change: a broadcast that
	// Watch and Keep wait on without holding mu.
	changed chan struct{}
}

// entry is a stored lease with its insertion order, which decides between
// overlapping leases (the older wins, as etcd's create revision does).
type entry struct {
	l     lease.Lease
	order int64
}

// notifyLocked wakes every watcher and keeper.
func (b *book) notifyLocked() {
	close(b.changed)
	b.changed = make(chan struct{})
}

// putLocked stores l (stamped with a fresh expiration) under key, keeping
// the order of a lease already there, and returns the stored lease.
func (b *book) putLocked(key string, l lease.Lease) lease.Lease {
	l = b.stamp(l)
	e, ok := b.leases[key]
	if !ok {
		b.seq++
		e.order = b.seq
	}
	e.l = l
	b.leases[key] = e
	return l
}

func (b *book) stamp(l lease.Lease) lease.Lease {
	l.Expiration = time.Time{}
	if b.ttl > 0 {
		l.Expiration = b.now().Add(b.ttl)
	}
	return l
}

func (b *book) expired(l lease.Lease) bool {
	return !l.Expiration.IsZero() && !b.now().Before(l.Expiration)
}

// pruneLocked drops expired leases and reports whether it dropped any.
func (b *book) pruneLocked() bool {
	pruned := false
	for key, e := range b.leases {
		if b.expired(e.l) {
			delete(b.leases, key)
			pruned = true
			b.log.Info("lease expired", "lease", e.l)
		}
	}
	return pruned
}

func (b *book) nextExpiryLocked() time.Time {
	var next time.Time
	for _, e := range b.leases {
		if x := e.l.Expiration; !x.IsZero() && (next.IsZero() || x.Before(next)) {
			next = x
		}
	}
	return next
}

func (b *book) listLocked() []lease.Lease {
	out := make([]lease.Lease, 0, len(b.leases))
	for _, e := range b.leases {
		out = append(out, cloneLease(e.l))
	}
	slices.SortFunc(out, func(a, b lease.Lease) int { return cmp.Compare(a.Key(), b.Key()) })
	return out
}

// verdictLocked judges the stored leases by lease.Config.Peers for the
// node with attrs (holding own, when known), and warns to log through w
// about ignored leases not reported before.
func (b *book) verdictLocked(attrs lease.Attrs, own lease.Lease, w *lease.Warnings, log *slog.Logger) lease.Verdict {
	id := b.cfg.Identity(attrs)
	cands := make([]lease.Candidate, 0, len(b.leases))
	for key, e := range b.leases {
		cands = append(cands, lease.Candidate{
			Name:  key,
			Lease: e.l,
			Order: e.order,
			Own:   id.IsValid() && b.cfg.Identity(e.l.Attrs) == id,
		})
	}
	slices.SortFunc(cands, func(a, b lease.Candidate) int { return cmp.Compare(a.Name, b.Name) })
	v := b.cfg.Peers(cands, own)
	for _, ig := range w.Fresh(v.Ignored) {
		log.Warn("ignoring lease", "key", ig.Name, "rule", string(ig.Rule), "reason", ig.Detail)
	}
	return v
}

// findByIdentityLocked finds the lease published under the address that
// identifies the node (lease.Config.Identity).
func (b *book) findByIdentityLocked(a lease.Attrs) (string, lease.Lease, bool) {
	id := b.cfg.Identity(a)
	if !id.IsValid() {
		return "", lease.Lease{}, false
	}
	for key, e := range b.leases {
		if b.cfg.Identity(e.l.Attrs) == id {
			return key, e.l, true
		}
	}
	return "", lease.Lease{}, false
}

// overlap reports a lease of taken sharing a subnet with l.
func overlap(taken []lease.Lease, l lease.Lease) (lease.Lease, bool) {
	for _, h := range taken {
		if (l.Subnet.IsValid() && h.Subnet.IsValid() && l.Subnet.Overlaps(h.Subnet)) ||
			(l.IPv6Subnet.IsValid() && h.IPv6Subnet.IsValid() && l.IPv6Subnet.Overlaps(h.IPv6Subnet)) {
			return h, true
		}
	}
	return lease.Lease{}, false
}

// sameOwner reports whether two leases of one key belong to the same
// node: the same identifying address (lease.Lease.Identity), or for
// leases without one equal attributes.
func sameOwner(a, b lease.Lease) bool {
	if id := a.Identity(); id.IsValid() || b.Identity().IsValid() {
		return id == b.Identity()
	}
	return a.Attrs.Equal(b.Attrs)
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
