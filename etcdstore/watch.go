package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flannelkit/flannel/internal/retry"
	"github.com/flannelkit/flannel/lease"
)

// Watch calls fn with the full set of leases under <prefix>/subnets/: a
// snapshot listed from etcd first (Resync true), then one after every
// change, until ctx ends; it then returns nil. It watches from the listed
// revision with a leader required, so a partitioned member cannot hold it
// on stale data. When the watch breaks (etcd down, no leader, revision
// compacted) it lists again with capped, jittered backoff and delivers a
// fresh snapshot with Resync true: nothing is missed, and nothing spins
// while etcd is unreachable.
//
// Keys or values that do not parse are skipped with a warning naming the
// key. Leases in snapshots carry no Expiration (etcd would need a request
// per key). fn is called from Watch's goroutine only.
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

		current, rev, err := s.snapshot(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			s.log.Warn("listing leases failed; retrying", "prefix", s.subnetsKey, "error", err)
			continue
		}
		fn(lease.Snapshot{Leases: sorted(current), Resync: true})

		progressed, err := s.follow(ctx, current, rev, fn)
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

// snapshot lists the leases and the revision of the listing.
func (s *Store) snapshot(ctx context.Context) (map[string]lease.Lease, int64, error) {
	rctx, cancel := s.reqCtx(ctx)
	defer cancel()
	resp, err := s.client.Get(rctx, s.subnetsKey, clientv3.WithPrefix())
	if err != nil {
		return nil, 0, fmt.Errorf("list %s: %w", s.subnetsKey, err)
	}
	current := make(map[string]lease.Lease, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		if l, ok := s.watchLease(kv); ok {
			current[string(kv.Key)] = l
		}
	}
	return current, resp.Header.Revision, nil
}

// follow applies watch events after rev to current and calls fn after each
// change. It returns when the watch breaks (with the reason) or ctx ends,
// and reports whether the watch delivered anything (so the caller's
// backoff can start over).
func (s *Store) follow(ctx context.Context, current map[string]lease.Lease, rev int64, fn func(lease.Snapshot)) (bool, error) {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	wch := s.client.Watch(clientv3.WithRequireLeader(wctx), s.subnetsKey,
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
		changed := false
		for _, ev := range resp.Events {
			key := string(ev.Kv.Key)
			old, had := current[key]
			switch ev.Type {
			case clientv3.EventTypeDelete:
				if had {
					delete(current, key)
					changed = true
				}
			case clientv3.EventTypePut:
				l, ok := s.watchLease(ev.Kv)
				switch {
				case !ok && had:
					delete(current, key)
					changed = true
				case ok && (!had || !old.Attrs.Equal(l.Attrs)):
					current[key] = l
					changed = true
				}
			}
		}
		if changed {
			fn(lease.Snapshot{Leases: sorted(current)})
		}
	}
	if ctx.Err() != nil {
		return progressed, nil
	}
	return progressed, errors.New("watch channel closed")
}

// watchLease parses kv for a snapshot, warning about what it skips.
func (s *Store) watchLease(kv *mvccpb.KeyValue) (lease.Lease, bool) {
	l, err := s.parse(kv.Key, kv.Value)
	if err != nil {
		s.log.Warn("skipping malformed lease", "key", string(kv.Key), "error", err)
		return lease.Lease{}, false
	}
	return l, true
}

func sorted(m map[string]lease.Lease) []lease.Lease {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.SortFunc(keys, strings.Compare)
	out := make([]lease.Lease, len(keys))
	for i, k := range keys {
		out[i] = m[k]
	}
	return out
}
