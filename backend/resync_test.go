package backend

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/lease"
)

// TestReconcilerResync: with Resync, periodic ticks repair only when the
// resync is due or the last Apply or repair failed (or Synced says the
// kernel is not known to match); a watcher's poke repairs at once.
func TestReconcilerResync(t *testing.T) {
	var f fakePlane
	var clock atomic.Int64 // fake time, in ns since start
	base := time.Now()
	var synced atomic.Bool
	synced.Store(true)
	var mu sync.Mutex
	ticks := 0
	pokes := make(chan struct{})
	r := NewReconciler(ReconcilerConfig{
		Apply:    func(ctx context.Context, p []lease.Lease) error { return f.run(ctx, p, false) },
		Repair:   func(ctx context.Context, p []lease.Lease) error { return f.run(ctx, p, true) },
		Interval: time.Millisecond,
		Resync:   time.Hour,
		Synced:   synced.Load,
		BeforeRepair: func(_ context.Context, why string) bool {
			if why == Periodic {
				mu.Lock()
				ticks++
				mu.Unlock()
			}
			return true
		},
	})
	r.now = func() time.Time { return base.Add(time.Duration(clock.Load())) }
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	require.NoError(t, r.Apply(ctx, []lease.Lease{peer("10.0.1.0/24", "192.0.2.1")}))
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.Run(ctx, func(ctx context.Context, poke func(string)) {
			for {
				select {
				case <-ctx.Done():
					return
				case <-pokes:
					poke("route event")
				}
			}
		})
	}()
	// waitTicks waits for n more periodic ticks to have been decided on
	// (the loop runs one repair at a time: tick n+1 starts after tick n).
	waitTicks := func(n int) {
		mu.Lock()
		want := ticks + n + 1
		mu.Unlock()
		require.Eventually(t, func() bool { mu.Lock(); defer mu.Unlock(); return ticks >= want }, 10*time.Second, time.Millisecond)
	}
	repairs := func() int { _, rep := f.counts(); return rep }

	waitTicks(3)
	assert.Zero(t, repairs(), "synced and the resync not due: ticks skip")

	pokes <- struct{}{}
	require.Eventually(t, func() bool { return repairs() == 1 }, 10*time.Second, time.Millisecond, "a kernel event repairs at once")

	clock.Add(int64(time.Hour))
	require.Eventually(t, func() bool { return repairs() == 2 }, 10*time.Second, time.Millisecond, "resync due: a tick repairs")
	waitTicks(3)
	assert.Equal(t, 2, repairs(), "then quiet for another Resync")

	synced.Store(false)
	require.Eventually(t, func() bool { return repairs() >= 4 }, 10*time.Second, time.Millisecond, "not synced: every tick repairs")
	synced.Store(true)
	waitTicks(1)
	n := repairs()
	waitTicks(3)
	assert.Equal(t, n, repairs(), "synced again: quiet")
	cancel()
	<-done
}

// TestReconcilerResyncAfterFailure: without Synced, a repair that failed
// with an error naming no peer makes the next ticks repair until one
// succeeds; peer errors alone do not.
func TestReconcilerResyncAfterFailure(t *testing.T) {
	var f fakePlane
	r := NewReconciler(ReconcilerConfig{
		Apply:    func(ctx context.Context, p []lease.Lease) error { return f.run(ctx, p, false) },
		Repair:   func(ctx context.Context, p []lease.Lease) error { return f.run(ctx, p, true) },
		Interval: time.Millisecond,
		Resync:   time.Hour,
	})
	ctx := context.Background()
	assert.Error(t, r.Apply(ctx, []lease.Lease{peer("10.0.2.0/24", "")}))
	assert.False(t, r.tickDue(), "a peer error alone: the kernel holds what could be programmed")

	f.mu.Lock()
	f.other = errors.New("dump failed")
	f.mu.Unlock()
	r.Repair(ctx, "route event")
	assert.True(t, r.tickDue(), "the repair failed: retry on the next tick")
	f.mu.Lock()
	f.other = nil
	f.mu.Unlock()
	r.Repair(ctx, Periodic)
	assert.False(t, r.tickDue(), "it succeeded: quiet until the resync")

	plain := NewReconciler(ReconcilerConfig{Apply: func(context.Context, []lease.Lease) error { return nil }, Interval: time.Millisecond})
	assert.True(t, plain.tickDue(), "no Resync: every tick repairs")
}

// TestReconcilerRepairsTheLastSet: a repair programs the set the last
// Apply was given (kept without a copy: Network.Apply's peers are
// read-only until the next Apply), and a shorter set replaces a longer
// one.
func TestReconcilerRepairsTheLastSet(t *testing.T) {
	var got []lease.Lease
	r := NewReconciler(ReconcilerConfig{
		Apply:  func(context.Context, []lease.Lease) error { return nil },
		Repair: func(_ context.Context, p []lease.Lease) error { got = p; return nil },
	})
	ctx := context.Background()
	peers := []lease.Lease{peer("10.0.1.0/24", "192.0.2.1"), peer("10.0.2.0/24", "192.0.2.2"), peer("10.0.3.0/24", "192.0.2.3")}
	require.NoError(t, r.Apply(ctx, peers))
	r.Repair(ctx, "test")
	require.Len(t, got, 3)
	assert.Same(t, &peers[0], &got[0], "the caller's set, not a copy")

	require.NoError(t, r.Apply(ctx, peers[2:]))
	r.Repair(ctx, "test")
	require.Len(t, got, 1)
	assert.Equal(t, "10.0.3.0/24", got[0].Subnet.String())
}
