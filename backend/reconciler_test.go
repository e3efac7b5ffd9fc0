package backend

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/lease"
)

// fakePlane records the calls of a Reconciler and fails the peers without
// a public IP.
type fakePlane struct {
	mu              sync.Mutex
	applies, repair int
	other           error // a non-peer error for every call
}

func (f *fakePlane) run(ctx context.Context, peers []lease.Lease, rep bool) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if rep {
		f.repair++
	} else {
		f.applies++
	}
	var errs []error
	for _, p := range peers {
		if !p.Attrs.PublicIP.IsValid() {
			errs = append(errs, fmt.Errorf("wrapped: %w", &flannel.PeerError{Lease: p, Err: errors.New("no public IP")}))
		}
	}
	return errors.Join(append(errs, f.other)...)
}

func (f *fakePlane) counts() (int, int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.applies, f.repair
}

func peer(subnet, ip string) lease.Lease {
	l := lease.Lease{Subnet: netip.MustParsePrefix(subnet), Attrs: lease.Attrs{BackendType: "t"}}
	if ip != "" {
		l.Attrs.PublicIP = netip.MustParseAddr(ip)
	}
	return l
}

func newFakeReconciler(f *fakePlane, log *testenv.LogBuffer) *Reconciler {
	return NewReconciler(ReconcilerConfig{
		Apply:    func(ctx context.Context, p []lease.Lease) error { return f.run(ctx, p, false) },
		Repair:   func(ctx context.Context, p []lease.Lease) error { return f.run(ctx, p, true) },
		Interval: time.Hour,
		Logger:   log.Logger(),
	})
}

func warnings(log *testenv.LogBuffer, parts ...string) int {
	n := 0
	for line := range strings.Lines(log.String()) {
		ok := strings.Contains(line, "level=WARN")
		for _, p := range parts {
			ok = ok && strings.Contains(line, p)
		}
		if ok {
			n++
		}
	}
	return n
}

func TestReconcilerRepairsOnlyAfterApply(t *testing.T) {
	var f fakePlane
	var log testenv.LogBuffer
	r := newFakeReconciler(&f, &log)
	ctx := context.Background()
	r.Repair(ctx, "test")
	assert.False(t, r.Applied())
	a, rep := f.counts()
	assert.Equal(t, [2]int{0, 0}, [2]int{a, rep}, "no repair before the first Apply")

	require.NoError(t, r.Apply(ctx, []lease.Lease{peer("10.0.1.0/24", "192.0.2.1")}))
	r.Repair(ctx, "test")
	a, rep = f.counts()
	assert.Equal(t, [2]int{1, 1}, [2]int{a, rep})
	assert.True(t, r.Applied())
}

// TestReconcilerWarnsOncePerLease: a peer that cannot be programmed is
// warned about once per change of its lease, over many repairs; other
// repair errors are logged every time.
func TestReconcilerWarnsOncePerLease(t *testing.T) {
	var f fakePlane
	var log testenv.LogBuffer
	r := newFakeReconciler(&f, &log)
	ctx := context.Background()
	bad := peer("10.0.2.0/24", "")
	good := peer("10.0.1.0/24", "192.0.2.1")

	err := r.Apply(ctx, []lease.Lease{good, bad})
	var pe *flannel.PeerError
	require.ErrorAs(t, err, &pe)
	assert.Equal(t, bad.Subnet, pe.Lease.Subnet)
	for range 5 {
		r.Repair(ctx, Periodic)
	}
	assert.Zero(t, warnings(&log, "peer not programmed"), "Apply returned it to its caller already:\n%s", log.String())

	// The lease changes (new backend data): one warning, then quiet.
	bad.Attrs.BackendData = []byte(`{"x":1}`)
	r.Locked(func() { r.peers[1] = bad })
	for range 5 {
		r.Repair(ctx, Periodic)
	}
	assert.Equal(t, 1, warnings(&log, "peer not programmed", "10.0.2.0/24"), log.String())

	// It recovers, then fails again with the same lease: a new failure.
	fixed := bad
	fixed.Attrs.PublicIP = netip.MustParseAddr("192.0.2.2")
	r.Locked(func() { r.peers[1] = fixed })
	r.Repair(ctx, Periodic)
	r.Locked(func() { r.peers[1] = bad })
	for range 3 {
		r.Repair(ctx, Periodic)
	}
	assert.Equal(t, 2, warnings(&log, "peer not programmed", "10.0.2.0/24"), log.String())
	assert.Zero(t, warnings(&log, "10.0.1.0/24"))

	// Errors that name no peer are logged on every repair.
	f.mu.Lock()
	f.other = errors.New("dump failed")
	f.mu.Unlock()
	for range 3 {
		r.Repair(ctx, Periodic)
	}
	assert.Equal(t, 3, warnings(&log, "repair failed", "dump failed"), log.String())
	assert.Equal(t, 2, warnings(&log, "peer not programmed"), log.String())
}

func TestReconcilerUpdateAndBeforeRepair(t *testing.T) {
	var f fakePlane
	var log testenv.LogBuffer
	changed := 0
	r := newFakeReconciler(&f, &log)
	ctx := context.Background()
	r.Update(ctx, "rekey", func() { changed++ })
	_, rep := f.counts()
	assert.Equal(t, 1, changed)
	assert.Zero(t, rep, "Update before Apply changes state but repairs nothing")

	var mu sync.Mutex
	var whys []string
	allow := false
	r = NewReconciler(ReconcilerConfig{
		Apply:    func(ctx context.Context, p []lease.Lease) error { return f.run(ctx, p, false) },
		Repair:   func(ctx context.Context, p []lease.Lease) error { return f.run(ctx, p, true) },
		Interval: time.Millisecond,
		BeforeRepair: func(ctx context.Context, why string) bool {
			mu.Lock()
			defer mu.Unlock()
			whys = append(whys, why)
			return allow
		},
	})
	require.NoError(t, r.Apply(ctx, nil))
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		r.Run(ctx, func(ctx context.Context, poke func(string)) { poke("event") })
	}()
	require.Eventually(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return len(whys) >= 3
	}, 10*time.Second, time.Millisecond)
	_, rep0 := f.counts()
	assert.Zero(t, rep0, "BeforeRepair said no")
	mu.Lock()
	assert.Contains(t, whys, "event")
	assert.Contains(t, whys, Periodic)
	allow = true
	mu.Unlock()
	require.Eventually(t, func() bool { _, rep := f.counts(); return rep > 0 }, 10*time.Second, time.Millisecond)
	cancel()
	<-done
}
