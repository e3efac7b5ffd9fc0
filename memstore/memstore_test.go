package memstore_test

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/flannelkit/flannel/internal/storetest"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/memstore"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func mustConfig(t *testing.T, js string) lease.Config {
	t.Helper()
	cfg, err := lease.ParseConfig([]byte(js))
	require.NoError(t, err)
	return cfg
}

func attrs(ip string) lease.Attrs {
	return lease.Attrs{PublicIP: netip.MustParseAddr(ip), BackendType: "host-gw"}
}

func nodeIP(i int) string { return fmt.Sprintf("192.168.%d.%d", i/250, i%250+1) }

func TestAcquireConcurrentDistinct(t *testing.T) {
	t.Parallel()
	// 10.10.0.0/22 in /28s: 63 subnets after the reserved first one.
	cfg := mustConfig(t, `{"Network":"10.10.0.0/22","SubnetLen":28,"IPv6Network":"fd00:10::/56","EnableIPv6":true}`)
	s := memstore.New(cfg, memstore.Options{})
	const n = 50
	got := make([]lease.Lease, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			got[i], errs[i] = s.Acquire(t.Context(), lease.Request{Attrs: attrs(nodeIP(i))})
		})
	}
	wg.Wait()
	seen4 := map[netip.Prefix]bool{}
	seen6 := map[netip.Prefix]bool{}
	for i := range n {
		require.NoError(t, errs[i])
		require.NoError(t, cfg.CheckLease(got[i]))
		assert.False(t, seen4[got[i].Subnet], "duplicate %s", got[i].Subnet)
		assert.False(t, seen6[got[i].IPv6Subnet], "duplicate %s", got[i].IPv6Subnet)
		seen4[got[i].Subnet], seen6[got[i].IPv6Subnet] = true, true
	}
	assert.Len(t, s.Leases(), n)
}

func TestAcquireExhaustion(t *testing.T) {
	t.Parallel()
	// /28 in /30s: 3 subnets (the first is skipped by SubnetMin's default).
	cfg := mustConfig(t, `{"Network":"10.20.0.0/28","SubnetLen":30}`)
	s := memstore.New(cfg, memstore.Options{})
	held := 0
	for i := range 10 {
		_, err := s.Acquire(t.Context(), lease.Request{Attrs: attrs(nodeIP(i))})
		if err != nil {
			assert.ErrorIs(t, err, lease.ErrNoFreeSubnet)
			assert.Contains(t, err.Error(), nodeIP(i), "error names the node")
			break
		}
		held++
	}
	assert.Equal(t, 3, held)

	// Freeing one makes room again.
	require.True(t, s.Remove(s.Leases()[0].Subnet))
	_, err := s.Acquire(t.Context(), lease.Request{Attrs: attrs("10.99.0.1")})
	require.NoError(t, err)
}

func TestAcquireReclaimAndPrevious(t *testing.T) {
	t.Parallel()
	cfg := mustConfig(t, `{"Network":"10.30.0.0/16"}`)
	tests := []struct {
		name string
		run  func(t *testing.T, s *memstore.Store)
	}{
		{
			name: "reclaim by public ip updates attrs",
			run: func(t *testing.T, s *memstore.Store) {
				a := attrs("192.0.2.1")
				first, err := s.Acquire(t.Context(), lease.Request{Attrs: a})
				require.NoError(t, err)
				a.BackendData = []byte(`{"VNI":1}`)
				again, err := s.Acquire(t.Context(), lease.Request{
					Attrs:    a,
					Previous: lease.Lease{Subnet: netip.MustParsePrefix("10.30.200.0/24")}, // reclaim wins
				})
				require.NoError(t, err)
				assert.Equal(t, first.Subnet, again.Subnet)
				assert.JSONEq(t, `{"VNI":1}`, string(again.Attrs.BackendData))
				require.Len(t, s.Leases(), 1)
				assert.JSONEq(t, `{"VNI":1}`, string(s.Leases()[0].Attrs.BackendData))
			},
		},
		{
			name: "previous outside the network ignored",
			run: func(t *testing.T, s *memstore.Store) {
				prev := lease.Lease{Subnet: netip.MustParsePrefix("10.99.1.0/24")}
				got, err := s.Acquire(t.Context(), lease.Request{Attrs: attrs("192.0.2.5"), Previous: prev})
				require.NoError(t, err)
				require.NoError(t, cfg.CheckLease(got))
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.run(t, memstore.New(cfg, memstore.Options{}))
		})
	}
}

// TestRemoveAndRelease: Remove and Release (memstore's own API) delete
// leases and wake watchers; removing twice reports false.
func TestRemoveAndRelease(t *testing.T) {
	t.Parallel()
	cfg := mustConfig(t, `{"Network":"10.50.0.0/16"}`)
	s := memstore.New(cfg, memstore.Options{})
	a, err := s.Acquire(t.Context(), lease.Request{Attrs: attrs("192.0.2.1"), Previous: lease.Lease{Subnet: netip.MustParsePrefix("10.50.1.0/24")}})
	require.NoError(t, err)
	b, err := s.Acquire(t.Context(), lease.Request{Attrs: attrs("192.0.2.2"), Previous: lease.Lease{Subnet: netip.MustParsePrefix("10.50.2.0/24")}})
	require.NoError(t, err)
	w := storetest.Watch(t, s)
	sn := w.WaitFor(t, "both", storetest.Len(2))
	assert.Equal(t, []string{"10.50.1.0-24", "10.50.2.0-24"}, storetest.Keys(sn), "sorted by key")

	require.True(t, s.Remove(a.Subnet))
	assert.False(t, s.Remove(a.Subnet), "already gone")
	sn = w.WaitFor(t, "a removed", storetest.Len(1))
	assert.Equal(t, []string{b.Key()}, storetest.Keys(sn))

	require.NoError(t, s.Release(t.Context(), b))
	w.WaitFor(t, "b released", storetest.Len(0))
}

func TestWatchSlowConsumerCoalesces(t *testing.T) {
	t.Parallel()
	cfg := mustConfig(t, `{"Network":"10.60.0.0/16"}`)
	s := memstore.New(cfg, memstore.Options{})
	release := make(chan struct{})
	var calls atomic.Int32
	var last atomic.Int32
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() {
		done <- s.Watch(ctx, func(sn lease.Snapshot) {
			if calls.Add(1) == 1 {
				<-release // the first callback blocks
			}
			last.Store(int32(len(sn.Leases)))
		})
	}()
	// While the watcher is stuck, the store keeps working (its lock is not
	// held across fn).
	for i := range 20 {
		_, err := s.Acquire(t.Context(), lease.Request{Attrs: attrs(nodeIP(i))})
		require.NoError(t, err)
	}
	close(release)
	storetest.Eventually(t, "the last state", func() bool { return last.Load() == 20 })
	cancel()
	require.NoError(t, <-done)
	assert.Less(t, calls.Load(), int32(21), "intermediate states coalesced")
}

func TestReleaseLeavesOtherNodesLease(t *testing.T) {
	t.Parallel()
	cfg := mustConfig(t, `{"Network":"10.71.0.0/16"}`)
	s := memstore.New(cfg, memstore.Options{})
	own, err := s.Acquire(t.Context(), lease.Request{Attrs: attrs("192.0.2.1")})
	require.NoError(t, err)
	// Gone and immediately taken by another node: a lease with the same
	// key exists, and Keep reports the loss.
	require.True(t, s.Remove(own.Subnet))
	other, err := s.Acquire(t.Context(), lease.Request{Attrs: attrs("192.0.2.2"), Previous: own})
	require.NoError(t, err)
	require.True(t, other.SameSubnets(own))
	assert.ErrorIs(t, s.Keep(t.Context(), own), lease.ErrLeaseLost)

	// Release of a lease held by someone else leaves it alone.
	require.NoError(t, s.Release(t.Context(), own))
	assert.Len(t, s.Leases(), 1)
}

func TestTTLExpiryAndRenewal(t *testing.T) {
	t.Parallel()
	cfg := mustConfig(t, `{"Network":"10.80.0.0/16"}`)
	var mu sync.Mutex
	now := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }

	s := memstore.New(cfg, memstore.Options{TTL: time.Hour, Now: clock})
	a, err := s.Acquire(t.Context(), lease.Request{Attrs: attrs("192.0.2.1")})
	require.NoError(t, err)
	assert.Equal(t, clock().Add(time.Hour), a.Expiration)

	// A re-acquire (reclaim) renews.
	advance(30 * time.Minute)
	a2, err := s.Acquire(t.Context(), lease.Request{Attrs: attrs("192.0.2.1")})
	require.NoError(t, err)
	assert.True(t, a2.SameSubnets(a))
	assert.Equal(t, clock().Add(time.Hour), a2.Expiration)

	// Not renewed for a TTL: gone, and Keep reports the loss.
	advance(time.Hour)
	assert.Empty(t, s.Leases())
	assert.ErrorIs(t, s.Keep(t.Context(), a2), lease.ErrLeaseLost)
}

func TestKeepRenews(t *testing.T) {
	t.Parallel()
	cfg := mustConfig(t, `{"Network":"10.81.0.0/16"}`)
	var mu sync.Mutex
	now := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	s := memstore.New(cfg, memstore.Options{TTL: time.Hour, RenewInterval: time.Millisecond, Now: clock})
	own, err := s.Acquire(t.Context(), lease.Request{Attrs: attrs("192.0.2.1")})
	require.NoError(t, err)
	mu.Lock()
	now = now.Add(time.Minute) // still far from expiry
	mu.Unlock()

	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- s.Keep(ctx, own) }()
	// The expiration moves forward while Keep runs.
	storetest.Eventually(t, "a renewal", func() bool {
		ls := s.Leases()
		return len(ls) == 1 && ls[0].Expiration.Equal(clock().Add(time.Hour))
	})
	cancel()
	require.NoError(t, <-done)
}

func TestWatchSeesExpiry(t *testing.T) {
	t.Parallel()
	cfg := mustConfig(t, `{"Network":"10.82.0.0/16"}`)
	s := memstore.New(cfg, memstore.Options{TTL: 20 * time.Millisecond})
	_, err := s.Acquire(t.Context(), lease.Request{Attrs: attrs("192.0.2.1")})
	require.NoError(t, err)
	// Without Keep, the lease expires and the watcher sees it go without
	// any other store activity.
	storetest.Watch(t, s).WaitFor(t, "the lease expired", storetest.Len(0))
}

func TestConfig(t *testing.T) {
	t.Parallel()
	cfg := mustConfig(t, `{"Network":"10.90.0.0/16"}`)
	got, err := memstore.New(cfg, memstore.Options{}).Config(t.Context())
	require.NoError(t, err)
	assert.True(t, cfg.Equal(got))
}

func TestFindOwn(t *testing.T) {
	t.Parallel()
	var mu sync.Mutex
	now := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	s := memstore.New(mustConfig(t, `{"Network":"10.90.0.0/16"}`), memstore.Options{TTL: time.Hour, Now: clock})
	a := attrs("192.0.2.1")
	a.BackendData = []byte(`{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:09"}`)
	held, err := s.Acquire(t.Context(), lease.Request{Attrs: a})
	require.NoError(t, err)

	tests := []struct {
		name  string
		attrs lease.Attrs
		found bool
	}{
		{"same public ip", lease.Attrs{PublicIP: netip.MustParseAddr("192.0.2.1")}, true},
		{"other public ip", lease.Attrs{PublicIP: netip.MustParseAddr("192.0.2.2")}, false},
		{"no public ip", lease.Attrs{}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, found, err := s.FindOwn(t.Context(), tt.attrs)
			require.NoError(t, err)
			require.Equal(t, tt.found, found)
			if !found {
				assert.Zero(t, l)
				return
			}
			assert.True(t, l.SameSubnets(held))
			assert.JSONEq(t, string(a.BackendData), string(l.Attrs.BackendData))
			assert.Equal(t, held.Expiration, l.Expiration, "FindOwn must not renew")
		})
	}
	assert.Len(t, s.Leases(), 1)

	// An expired lease is not found.
	mu.Lock()
	now = now.Add(2 * time.Hour)
	mu.Unlock()
	_, found, err := s.FindOwn(t.Context(), a)
	require.NoError(t, err)
	assert.False(t, found)

	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	_, _, err = s.FindOwn(ctx, a)
	assert.ErrorIs(t, err, context.Canceled)
}
