package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flannelkit/flannel/internal/retry"
	"github.com/flannelkit/flannel/lease"
)

// Keep holds own until ctx ends, and then returns nil. It renews the key's
// etcd lease when less than the renew margin is left: a keep-alive when the
// etcd lease has the store's TTL, else the key is re-put unchanged with a
// new etcd lease of the store's TTL (as upstream does). Between renewals it
// watches the key. Failures (etcd down, no leader) are retried with capped,
// jittered backoff, for as long as ctx lives.
//
// It returns an error wrapping lease.ErrLeaseLost when the key is gone
// (deleted, or expired while this node could not renew it) or holds another
// node's public IP. A reservation (a key without an etcd lease) needs no
// renewal; Keep then only watches it.
func (s *Store) Keep(ctx context.Context, own lease.Lease) error {
	key := s.LeaseKey(own)
	bo := s.newBackoff()
	again := func(what string, err error) bool {
		d := bo.Next()
		s.log.Warn("keeping lease: "+what+" failed; retrying", "key", key, "error", err, "retry_in", d)
		return retry.Sleep(ctx, d) == nil
	}
	for {
		if ctx.Err() != nil {
			return nil
		}
		rctx, cancel := s.reqCtx(ctx)
		resp, err := s.client.Get(rctx, key)
		cancel()
		if err != nil {
			if ctx.Err() != nil || !again("read", err) {
				return nil
			}
			continue
		}
		if len(resp.Kvs) == 0 {
			return fmt.Errorf("keep lease %s: key deleted or expired: %w", key, lease.ErrLeaseLost)
		}
		kv := resp.Kvs[0]
		if err := s.checkOwner(kv, own); err != nil {
			return err
		}

		wait := time.Duration(-1) // forever: a reservation
		if kv.Lease != 0 {
			rctx, cancel := s.reqCtx(ctx)
			ttl, err := s.client.TimeToLive(rctx, clientv3.LeaseID(kv.Lease))
			cancel()
			if err != nil {
				if ctx.Err() != nil || !again("read ttl", err) {
					return nil
				}
				continue
			}
			if ttl.TTL <= 0 {
				// The etcd lease is gone, and the key with it (a read
				// from before the expiry, or an instant before it).
				return fmt.Errorf("keep lease %s: etcd lease expired: %w", key, lease.ErrLeaseLost)
			}
			left := time.Duration(ttl.TTL) * time.Second
			if left <= s.margin {
				if err := s.renew(ctx, kv, ttl.GrantedTTL); err != nil {
					if ctx.Err() != nil || !again("renew", err) {
						return nil
					}
					continue
				}
				bo.Reset()
				continue
			}
			wait = left - s.margin
		}

		err = s.waitKey(ctx, key, kv.ModRevision, wait)
		switch {
		case ctx.Err() != nil:
			return nil
		case errors.Is(err, lease.ErrLeaseLost):
			return err
		case err != nil:
			if !again("watch", err) {
				return nil
			}
		default:
			bo.Reset()
		}
	}
}

// newBackoff returns a backoff between the store's retry bounds, jittered
// from the store's random source.
func (s *Store) newBackoff() *retry.Backoff {
	return &retry.Backoff{Min: s.retryMin, Max: s.retryMax, Rand: s.randN}
}

// checkOwner returns an ErrLeaseLost error unless kv holds own's node.
func (s *Store) checkOwner(kv *mvccpb.KeyValue, own lease.Lease) error {
	cur, err := s.parse(kv.Key, kv.Value)
	if err != nil {
		return fmt.Errorf("keep lease %s: value overwritten with something unreadable (%v): %w", kv.Key, err, lease.ErrLeaseLost)
	}
	if id := own.Identity(); !id.IsValid() || cur.Identity() != id {
		return fmt.Errorf("keep lease %s: taken by %s: %w", kv.Key, cur.Identity(), lease.ErrLeaseLost)
	}
	return nil
}

// renew extends kv's etcd lease, or moves kv to a new one of the store's
// TTL when its TTL differs (e.g. it was granted with another TTL).
func (s *Store) renew(ctx context.Context, kv *mvccpb.KeyValue, grantedTTL int64) error {
	key := string(kv.Key)
	old := clientv3.LeaseID(kv.Lease)
	if grantedTTL == s.ttlSeconds || grantedTTL == s.grantedTTL.Load() {
		rctx, cancel := s.reqCtx(ctx)
		defer cancel()
		if _, err := s.client.KeepAliveOnce(rctx, old); err != nil {
			return fmt.Errorf("keep-alive etcd lease %x of %s: %w", int64(old), key, err)
		}
		s.log.Debug("lease renewed", "key", key)
		s.renewed(key)
		return nil
	}
	g, err := s.grant(ctx)
	if err != nil {
		return err
	}
	rctx, cancel := s.reqCtx(ctx)
	defer cancel()
	txn, err := s.client.Txn(rctx).
		If(clientv3.Compare(clientv3.ModRevision(key), "=", kv.ModRevision)).
		Then(clientv3.OpPut(key, string(kv.Value), clientv3.WithLease(g))).Commit()
	if err != nil || !txn.Succeeded {
		s.revoke(ctx, g)
		if err == nil {
			err = errRace
		}
		return fmt.Errorf("renew %s with a new etcd lease: %w", key, err)
	}
	s.revoke(ctx, old)
	s.log.Debug("lease renewed with a new etcd lease", "key", key, "ttl", s.ttl)
	s.renewed(key)
	return nil
}

func (s *Store) renewed(key string) {
	if s.onRenew != nil {
		s.onRenew(key)
	}
}

// waitKey waits until d passed (d < 0: forever), the key changed after rev,
// or ctx ended. A deleted key yields an ErrLeaseLost error; a changed key
// returns nil so that the caller re-reads it; a broken watch (no leader,
// compaction, closed) returns an error to back off on.
func (s *Store) waitKey(ctx context.Context, key string, rev int64, d time.Duration) error {
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	wch := s.client.Watch(clientv3.WithRequireLeader(wctx), key, clientv3.WithRev(rev+1))
	var timer <-chan time.Time
	if d >= 0 {
		t := time.NewTimer(d)
		defer t.Stop()
		timer = t.C
	}
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-timer:
			return nil
		case resp, ok := <-wch:
			if !ok {
				return errors.New("watch closed")
			}
			if err := resp.Err(); err != nil {
				return fmt.Errorf("watch %s: %w", key, err)
			}
			for _, ev := range resp.Events {
				if ev.Type == clientv3.EventTypeDelete {
					return fmt.Errorf("keep lease %s: key deleted or expired: %w", key, lease.ErrLeaseLost)
				}
			}
			if len(resp.Events) > 0 {
				return nil
			}
		}
	}
}
