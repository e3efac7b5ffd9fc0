package etcdstore

import (
	"cmp"
	"context"
	"errors"
	"slices"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flannelkit/flannel/internal/retry"
	"github.com/flannelkit/flannel/lease"
)

// Watch calls fn with the set of valid leases under <prefix>/subnets/
// (lease.Config.Peers: keys outside the network, of another length,
// overlapping an older key, or claiming this node's subnet are left out):
// a snapshot listed from etcd first (Resync true; the first Watch after an
// Acquire starts from the listing Acquire worked on, so that a starting
// node lists once), then one after every change to that set, until ctx
// ends; it then returns nil. It watches from
// the listed revision with a leader required, so a partitioned member
// cannot hold it on stale data. When the watch breaks (etcd down, no
// leader, revision compacted) it reads the config and lists again with
// capped, jittered backoff and delivers a fresh snapshot with Resync true:
// nothing is missed, and nothing spins while etcd is unreachable.
//
// Ignored keys and keys or values that do not parse are warned about once
// per change to their value, naming the key, not on every re-list. Leases
// in snapshots carry no Expiration (etcd would need a request per key). fn
// is called from Watch's goroutine only.
func (s *Store) Watch(ctx context.Context, fn func(lease.Snapshot)) error {
	bo := s.newBackoff()
	first := true
	for {
		if !first {
			if retry.Sleep(ctx, bo.Next()) != nil {
				return nil
			}
		}
		first = false

		cfg, err := s.Config(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			s.log.Warn("reading the network config failed; retrying", "error", err)
			continue
		}
		w := &watchState{s: s, cfg: cfg, fn: fn}
		rev, err := w.list(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			s.log.Warn("listing leases failed; retrying", "prefix", s.subnetsKey, "error", err)
			continue
		}
		progressed, err := w.follow(ctx, rev)
		if ctx.Err() != nil {
			return nil
		}
		if progressed {
			bo.Reset()
		}
		level := s.log.Warn
		if errors.Is(err, rpctypes.ErrCompacted) {
			level = s.log.Info
		}
		level("lease watch broken; listing again", "prefix", s.subnetsKey, "error", err)
	}
}

// watchState is one listing of Watch and the events that follow it.
type watchState struct {
	s   *Store
	cfg lease.Config
	fn  func(lease.Snapshot)
	// The keys under <prefix>/subnets/, each sorted by key: those that
	// parsed as the candidates judged in place on every change (no map and
	// no copy of every key per event), the others (rare) apart.
	cands     []lease.Candidate
	malformed []lease.Ignored
	// feed builds the snapshots from cands: a change that only adds keys
	// copies none of the leases delivered before.
	feed lease.Feed
}

func byName(a lease.Candidate, key string) int { return cmp.Compare(a.Name, key) }

func byIgnoredName(a lease.Ignored, key string) int { return cmp.Compare(a.Name, key) }

// put records e under its key, in place of what the key held. A put that
// changes nothing a snapshot shows (a renewal: a new TTL lease, the same
// value) keeps the candidate the key had, and with it what feed knows.
func (w *watchState) put(e entry) {
	name := w.s.name(e.key)
	if e.ok {
		if i, ok := slices.BinarySearchFunc(w.cands, name, byName); ok &&
			w.cands[i].Order == e.createRev && leaseEqual(w.cands[i].Lease, e.l) {
			return
		}
	}
	w.del(e.key)
	if !e.ok {
		i, _ := slices.BinarySearchFunc(w.malformed, name, byIgnoredName)
		w.malformed = slices.Insert(w.malformed, i, w.s.malformedOf(e))
		return
	}
	i, _ := slices.BinarySearchFunc(w.cands, name, byName)
	w.cands = slices.Insert(w.cands, i, w.s.candidateOf(e))
}

// del forgets key.
func (w *watchState) del(key string) {
	name := w.s.name(key)
	if i, ok := slices.BinarySearchFunc(w.cands, name, byName); ok {
		w.cands = slices.Delete(w.cands, i, i+1)
	}
	if i, ok := slices.BinarySearchFunc(w.malformed, name, byIgnoredName); ok {
		w.malformed = slices.Delete(w.malformed, i, i+1)
	}
}

// list lists the keys (or takes the listing the last Acquire kept),
// delivers the first snapshot (Resync) and returns the revision of the
// listing.
func (w *watchState) list(ctx context.Context) (int64, error) {
	l, ok := w.s.takePrimed()
	if !ok {
		entries, rev, err := w.s.list(ctx)
		if err != nil {
			return 0, err
		}
		l.cands, l.malformed = w.s.candidates(w.cfg, entries, lease.Attrs{}) // deliver sets Own
		l.rev = rev
	}
	// The listing's keys become the watch's: no copy of every candidate
	// (candidates left room for the key Acquire wrote).
	w.cands, w.malformed = l.cands, l.malformed
	if l.wrote.key != "" {
		w.put(l.wrote)
	}
	rev := l.rev
	l = listing{}
	w.deliver(true)
	return rev, nil
}

// deliver judges the current keys and calls fn when resync is set or the
// valid leases changed since the last call.
func (w *watchState) deliver(resync bool) {
	own := w.s.ownLease()
	for i := range w.cands { // this node's identity may have changed
		w.cands[i].Own = w.cfg.SameNode(own.Attrs, w.cands[i].Lease.Attrs)
	}
	leases, ignored, changed := w.feed.Next(w.cfg, w.cands, own)
	w.s.warnIgnored(ignored, w.malformed)
	if !resync && !changed {
		return
	}
	w.fn(lease.Snapshot{Leases: leases, Resync: resync})
}

func leaseEqual(a, b lease.Lease) bool {
	return a.SameSubnets(b) && a.Attrs.Equal(b.Attrs)
}

// follow applies watch events after rev to the current keys and delivers
// a snapshot after each change. It returns when the watch breaks (with the
// reason) or ctx ends, and reports whether the watch delivered anything
// (so the caller's backoff can start over).
func (w *watchState) follow(ctx context.Context, rev int64) (bool, error) {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	wch := w.s.client.Watch(clientv3.WithRequireLeader(wctx), w.s.subnetsKey,
		clientv3.WithPrefix(), clientv3.WithRev(rev+1))
	progressed := false
	for resp := range wch {
		if err := resp.Err(); err != nil {
			return progressed, err
		}
		if resp.Canceled {
			return progressed, errors.New("watch canceled by the server")
		}
		progressed = true
		for _, ev := range resp.Events {
			key := string(ev.Kv.Key)
			switch ev.Type {
			case clientv3.EventTypeDelete:
				w.del(key)
			case clientv3.EventTypePut:
				w.put(w.s.entryOf(ev.Kv))
			}
		}
		if len(resp.Events) > 0 {
			w.deliver(false)
		}
	}
	if ctx.Err() != nil {
		return progressed, nil
	}
	return progressed, errors.New("watch channel closed")
}
