package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"slices"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flannelkit/flannel/internal/retry"
	"github.com/flannelkit/flannel/lease"
)

// Watch calls fn with the set of valid leases under <prefix>/subnets/
// (lease.Config.Peers: keys outside the network, of another length,
// overlapping an older key, or claiming this node's subnet are left out):
// a snapshot listed from etcd first (Resync true), then one after every
// change to that set, until ctx ends; it then returns nil. It watches from
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
	s       *Store
	cfg     lease.Config
	fn      func(lease.Snapshot)
	current map[string]entry
	keys    []string      // the keys of current, sorted: judge gets them in order
	last    []lease.Lease // delivered last
}

// put records e under key.
func (w *watchState) put(key string, e entry) {
	if _, ok := w.current[key]; !ok {
		i, _ := slices.BinarySearch(w.keys, key)
		w.keys = slices.Insert(w.keys, i, key)
	}
	w.current[key] = e
}

// del forgets key.
func (w *watchState) del(key string) {
	if _, ok := w.current[key]; !ok {
		return
	}
	delete(w.current, key)
	if i, ok := slices.BinarySearch(w.keys, key); ok {
		w.keys = slices.Delete(w.keys, i, i+1)
	}
}

// list lists the keys, delivers the first snapshot (Resync) and returns
// the revision of the listing.
func (w *watchState) list(ctx context.Context) (int64, error) {
	s := w.s
	rctx, cancel := s.reqCtx(ctx)
	defer cancel()
	resp, err := s.client.Get(rctx, s.subnetsKey, clientv3.WithPrefix())
	if err != nil {
		return 0, fmt.Errorf("list %s: %w", s.subnetsKey, err)
	}
	w.current = make(map[string]entry, len(resp.Kvs))
	w.keys = make([]string, 0, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		k := string(kv.Key)
		if _, dup := w.current[k]; !dup {
			w.keys = append(w.keys, k)
		}
		w.current[k] = s.entryOf(kv)
	}
	slices.Sort(w.keys) // etcd lists in key order already: cheap
	w.deliver(true)
	return resp.Header.Revision, nil
}

// deliver judges the current keys and calls fn when resync is set or the
// valid leases changed since the last call.
func (w *watchState) deliver(resync bool) {
	// No buffers kept between events: they would add every key's entry
	// and candidate to the live heap (and twice that to the peak RSS).
	entries := make([]entry, 0, len(w.keys))
	for _, k := range w.keys {
		entries = append(entries, w.current[k])
	}
	own := w.s.ownLease()
	v, _ := w.s.verdict(w.cfg, entries, own.Attrs, own, nil)
	leases := v.Leases()
	if !resync && slices.EqualFunc(w.last, leases, leaseEqual) {
		return
	}
	w.last = leases
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
				w.put(key, w.s.entryOf(ev.Kv))
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
