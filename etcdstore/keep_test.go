package etcdstore_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flannelkit/flannel/etcdstore"
	"github.com/flannelkit/flannel/internal/etcdtest"
	"github.com/flannelkit/flannel/internal/storetest"
	"github.com/flannelkit/flannel/lease"
)

// keeper runs Store.Keep in the background.
type keeper struct {
	cancel context.CancelFunc
	done   chan error
}

func startKeep(t *testing.T, s *etcdstore.Store, own lease.Lease) *keeper {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	k := &keeper{cancel: cancel, done: make(chan error, 1)}
	go func() { k.done <- s.Keep(ctx, own) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-k.done:
		case <-time.After(30 * time.Second):
			t.Error("Keep did not return after cancel")
		}
	})
	return k
}

func (k *keeper) wait(t *testing.T) error {
	t.Helper()
	select {
	case err := <-k.done:
		k.done <- err // for the cleanup
		return err
	case <-time.After(60 * time.Second):
		t.Fatal("Keep did not return")
		return nil
	}
}

func TestTTLExpiryAndRenewal(t *testing.T) {
	t.Parallel()
	e := newEnv(t, etcdtest.Options{})
	e.putConfig(t, netConf)
	ctx := t.Context()
	opts := etcdstore.Options{TTL: 2 * time.Second, RenewMargin: time.Second}
	peer := e.store(t, nil, opts)
	w := storetest.Watch(t, peer)

	// A node that stops renewing disappears for its peers.
	gone := e.store(t, nil, opts)
	l1, err := gone.Acquire(ctx, lease.Request{Attrs: attrs(1)})
	require.NoError(t, err)
	w.WaitFor(t, "lease added", storetest.HasKey(l1.Key()))
	w.WaitFor(t, "lease expired", storetest.Not(storetest.HasKey(l1.Key())))

	// A node that renews stays, across several TTLs: no delete event.
	var renewals atomic.Int64
	var renewedKey atomic.Value
	keptOpts := opts
	keptOpts.OnRenew = func(key string) { renewedKey.Store(key); renewals.Add(1) }
	kept := e.store(t, nil, keptOpts)
	l2, err := kept.Acquire(ctx, lease.Request{Attrs: attrs(2)})
	require.NoError(t, err)
	kv, ok := e.get(t, kept.LeaseKey(l2))
	require.True(t, ok)
	k := startKeep(t, kept, l2)
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	events := e.admin.Watch(wctx, kept.LeaseKey(l2), clientv3.WithRev(kv.ModRevision+1))
	deadline := time.After(4 * opts.TTL)
	for done := false; !done; {
		select {
		case resp := <-events:
			require.NoError(t, resp.Err())
			for _, ev := range resp.Events {
				require.NotEqual(t, clientv3.EventTypeDelete, ev.Type, "lease %s deleted while kept", l2)
			}
		case err := <-k.done:
			t.Fatalf("Keep returned early: %v", err)
		case <-deadline:
			done = true
		}
	}
	after, ok := e.get(t, kept.LeaseKey(l2))
	require.True(t, ok, "kept lease still there after 4 TTLs")
	assert.Equal(t, kv.Value, after.Value)
	ttl, err := e.admin.TimeToLive(ctx, clientv3.LeaseID(after.Lease))
	require.NoError(t, err)
	assert.Positive(t, ttl.TTL)
	assert.True(t, storetest.HasKey(l2.Key())(w.All()[len(w.All())-1]), "peers still see it")
	// Renewing every TTL-margin (1 s) over 4 TTLs (8 s): several reported.
	assert.GreaterOrEqual(t, renewals.Load(), int64(3), "OnRenew calls")
	assert.Equal(t, kept.LeaseKey(l2), renewedKey.Load())
}

// TestKeepMovesToStoreTTL: a key on an etcd lease of another TTL (here
// shorter, as if written by a node with another setting) is re-put on a
// lease of the store's TTL with its value unchanged.
func TestKeepMovesToStoreTTL(t *testing.T) {
	t.Parallel()
	e := newEnv(t, etcdtest.Options{})
	e.putConfig(t, netConf)
	ctx := t.Context()
	l, err := e.store(t, nil, etcdstore.Options{TTL: 2 * time.Second}).Acquire(ctx, lease.Request{Attrs: attrs(1)})
	require.NoError(t, err)
	s := e.store(t, nil, etcdstore.Options{TTL: 5 * time.Second, RenewMargin: 3 * time.Second})
	before, ok := e.get(t, s.LeaseKey(l))
	require.True(t, ok)
	startKeep(t, s, l)
	var after *clientKV
	storetest.Eventually(t, "key moved to a new etcd lease", func() bool {
		after, ok = e.get(t, s.LeaseKey(l))
		require.True(t, ok, "key lost")
		return after.Lease != before.Lease
	})
	assert.Equal(t, before.Value, after.Value)
	ttl, err := e.admin.TimeToLive(ctx, clientv3.LeaseID(after.Lease))
	require.NoError(t, err)
	assert.EqualValues(t, 5, ttl.GrantedTTL)
	// The old lease is revoked right after the move (Keep's next step).
	storetest.Eventually(t, "old etcd lease revoked", func() bool {
		old, err := e.admin.TimeToLive(ctx, clientv3.LeaseID(before.Lease))
		require.NoError(t, err)
		return old.TTL == -1
	})
}

func TestKeepLost(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		steal func(t *testing.T, e *env, key string)
	}{
		{name: "garbled", steal: func(t *testing.T, e *env, key string) {
			_, err := e.admin.Put(t.Context(), key, `{"PublicIP":`)
			require.NoError(t, err)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newEnv(t, etcdtest.Options{})
			e.putConfig(t, netConf)
			s := e.store(t, nil, etcdstore.Options{})
			l, err := s.Acquire(t.Context(), lease.Request{Attrs: attrs(1)})
			require.NoError(t, err)
			k := startKeep(t, s, l)
			// Our own re-acquire (attributes update) is not a loss.
			_, err = s.Acquire(t.Context(), lease.Request{Attrs: attrs(1)})
			require.NoError(t, err)
			tt.steal(t, e, s.LeaseKey(l))
			err = k.wait(t)
			require.ErrorIs(t, err, lease.ErrLeaseLost)
			assert.Contains(t, err.Error(), s.LeaseKey(l))
		})
	}
}

func TestKeepReturnsNilOnCancel(t *testing.T) {
	t.Parallel()
	e := newEnv(t, etcdtest.Options{})
	e.putConfig(t, netConf)
	s := e.store(t, nil, etcdstore.Options{})
	l, err := s.Acquire(t.Context(), lease.Request{Attrs: attrs(1)})
	require.NoError(t, err)
	// While etcd is down (the suite checks the plain case).
	e.srv.Stop()
	ctx2, cancel2 := context.WithTimeout(t.Context(), 2*time.Second)
	defer cancel2()
	require.NoError(t, s.Keep(ctx2, l))
}
