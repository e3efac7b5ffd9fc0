package storetest

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/flannelkit/flannel/lease"
)

// Watchable is what Watch needs of a store.
type Watchable interface {
	Watch(ctx context.Context, fn func(lease.Snapshot)) error
}

// Watcher runs a store's Watch in the background and records the
// snapshots. It checks three parts of the contract on the way: fn is never
// called from two goroutines at once, Watch returns nil on cancel, and a
// snapshot's leases are never written after it was handed out (a store
// may share them between snapshots; see lease.Feed).
// Waits are bounded by the test's deadline (go test -timeout), not by a
// timeout of their own.
type Watcher struct {
	mu     sync.Mutex
	snaps  []lease.Snapshot
	copies [][]lease.Lease // of each snapshot's leases when it came
	wake   chan struct{}
	inFn   atomic.Int32
	overlp atomic.Bool
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
}

// Watch starts s.Watch for the rest of the test; it is stopped (and its
// nil result checked) at cleanup, or earlier by Stop.
func Watch(t testing.TB, s Watchable) *Watcher {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	w := &Watcher{wake: make(chan struct{}, 1), cancel: cancel, done: make(chan error, 1)}
	go func() {
		w.done <- s.Watch(ctx, func(sn lease.Snapshot) {
			if w.inFn.Add(1) > 1 {
				w.overlp.Store(true)
			}
			defer w.inFn.Add(-1)
			w.mu.Lock()
			w.snaps = append(w.snaps, sn)
			w.copies = append(w.copies, slices.Clone(sn.Leases))
			w.mu.Unlock()
			select {
			case w.wake <- struct{}{}:
			default:
			}
		})
	}()
	t.Cleanup(func() { w.Stop(t) })
	return w
}

// Stop cancels the watch and fails t unless Watch returned nil. It may be
// called more than once.
func (w *Watcher) Stop(t testing.TB) {
	t.Helper()
	w.once.Do(func() {
		w.cancel()
		if err := waitChan(t, w.done); err != nil {
			t.Errorf("Watch returned %v on cancel, want nil", err)
		}
		if w.overlp.Load() {
			t.Error("Watch called fn from two goroutines at once")
		}
		w.mu.Lock()
		defer w.mu.Unlock()
		for i, sn := range w.snaps {
			if !slices.EqualFunc(sn.Leases, w.copies[i], sameLease) {
				t.Errorf("snapshot %d changed after Watch handed it out: now %v, was %v", i, sn.Leases, w.copies[i])
			}
		}
	})
}

func sameLease(a, b lease.Lease) bool {
	return a.SameSubnets(b) && a.Attrs.Equal(b.Attrs) && a.Expiration.Equal(b.Expiration)
}

// All returns the snapshots seen so far.
func (w *Watcher) All() []lease.Snapshot {
	w.mu.Lock()
	defer w.mu.Unlock()
	return append([]lease.Snapshot(nil), w.snaps...)
}

// Last returns the latest snapshot, false before the first.
func (w *Watcher) Last() (lease.Snapshot, bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.snaps) == 0 {
		return lease.Snapshot{}, false
	}
	return w.snaps[len(w.snaps)-1], true
}

// WaitFor waits until the latest snapshot satisfies ok and returns it.
func (w *Watcher) WaitFor(t testing.TB, what string, ok func(lease.Snapshot) bool) lease.Snapshot {
	t.Helper()
	deadline := deadlineOf(t)
	for {
		last, have := w.Last()
		if have && ok(last) {
			return last
		}
		select {
		case <-w.wake:
		case <-deadline:
			t.Fatalf("watch: gave up at the test deadline waiting for %s; last snapshot %v", what, Keys(last))
		}
	}
}

// Eventually polls cond until it holds, up to the test's deadline.
func Eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := deadlineOf(t)
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for !cond() {
		select {
		case <-tick.C:
		case <-deadline:
			t.Fatalf("gave up at the test deadline waiting for %s", what)
		}
	}
}

// deadlineOf fires shortly before the test binary's deadline (never
// without one), so that a failure names what was awaited rather than
// ending in go test's panic.
func deadlineOf(t testing.TB) <-chan time.Time {
	tt, ok := t.(interface{ Deadline() (time.Time, bool) })
	if !ok {
		return nil
	}
	d, ok := tt.Deadline()
	if !ok {
		return nil
	}
	return time.After(time.Until(d) - max(time.Until(d)/20, time.Second))
}

func waitChan[T any](t testing.TB, ch <-chan T) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-deadlineOf(t):
		t.Fatal("gave up at the test deadline")
	}
	var zero T
	return zero
}

// Keys returns the lease keys of a snapshot, for messages.
func Keys(sn lease.Snapshot) []string {
	out := make([]string, 0, len(sn.Leases))
	for _, l := range sn.Leases {
		out = append(out, l.Key())
	}
	return out
}

// HasKey is a WaitFor condition: a lease with key is in the snapshot.
func HasKey(key string) func(lease.Snapshot) bool {
	return func(sn lease.Snapshot) bool {
		for _, l := range sn.Leases {
			if l.Key() == key {
				return true
			}
		}
		return false
	}
}

// Not negates a WaitFor condition.
func Not(f func(lease.Snapshot) bool) func(lease.Snapshot) bool {
	return func(sn lease.Snapshot) bool { return !f(sn) }
}

// Len is a WaitFor condition: the snapshot has n leases.
func Len(n int) func(lease.Snapshot) bool {
	return func(sn lease.Snapshot) bool { return len(sn.Leases) == n }
}

func describe(l lease.Lease) string { return fmt.Sprintf("%s (%s)", l, l.Identity()) }
