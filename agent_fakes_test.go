package flannel_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/memstore"
)

// Compile-time checks of the fakes and of the in-memory store.
var (
	_ flannel.Backend       = (*fakeBackend)(nil)
	_ flannel.Network       = (*fakeNetwork)(nil)
	_ flannel.LeaseStore    = (*memstore.Store)(nil)
	_ flannel.LeaseReleaser = (*memstore.Store)(nil)
	_ flannel.LeaseStore    = (*wrapStore)(nil)
	_ error                 = (*flannel.SubnetChangedError)(nil)
)

// fakeBackend records the calls an Agent makes; its networks record Apply.
// The agent tests check the agent's logic; the real-kernel behaviour is
// covered by the backends' own tests and the end-to-end tests.
type fakeBackend struct {
	mtu int
	// apply, when set, is called by every Apply (with the call's index).
	apply func(ctx context.Context, n int, peers []lease.Lease) error

	mu       sync.Mutex
	prepared int
	cleaned  int
	networks []*fakeNetwork
	applied  chan struct{} // signalled after every Apply
}

func newFakeBackend() *fakeBackend {
	return &fakeBackend{mtu: 1450, applied: make(chan struct{}, 1)}
}

func (b *fakeBackend) Type() string { return "fake" }

func (b *fakeBackend) Prepare(ctx context.Context, env flannel.Env) (lease.Attrs, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.prepared++
	return lease.Attrs{BackendData: []byte(`{"Fake":true}`)}, nil
}

func (b *fakeBackend) Start(ctx context.Context, own lease.Lease) (flannel.Network, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	n := &fakeNetwork{b: b, own: own}
	b.networks = append(b.networks, n)
	return n, nil
}

func (b *fakeBackend) Cleanup(ctx context.Context, env flannel.Env) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.cleaned++
	return nil
}

func (b *fakeBackend) started() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return len(b.networks)
}

func (b *fakeBackend) preparedCount() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.prepared
}

func (b *fakeBackend) cleanedCount() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.cleaned
}

// applies returns every peer set passed to Apply, across networks.
func (b *fakeBackend) applies() [][]lease.Lease {
	b.mu.Lock()
	defer b.mu.Unlock()
	var out [][]lease.Lease
	for _, n := range b.networks {
		out = append(out, n.calls...)
	}
	return out
}

func (b *fakeBackend) lastApply() ([]lease.Lease, bool) {
	a := b.applies()
	if len(a) == 0 {
		return nil, false
	}
	return a[len(a)-1], true
}

type fakeNetwork struct {
	b     *fakeBackend
	own   lease.Lease
	calls [][]lease.Lease // guarded by b.mu
}

func (n *fakeNetwork) Lease() lease.Lease { return n.own }
func (n *fakeNetwork) MTU() int           { return n.b.mtu }

func (n *fakeNetwork) Apply(ctx context.Context, peers []lease.Lease) error {
	n.b.mu.Lock()
	idx := len(n.calls)
	hook := n.b.apply
	n.b.mu.Unlock()
	var err error
	if hook != nil {
		err = hook(ctx, idx, peers)
	}
	n.b.mu.Lock()
	n.calls = append(n.calls, slices.Clone(peers))
	n.b.mu.Unlock()
	select {
	case n.b.applied <- struct{}{}:
	default:
	}
	return err
}

func (n *fakeNetwork) Run(ctx context.Context) error {
	<-ctx.Done()
	return nil
}

// wrapStore wraps a memstore to inject failures and observe calls.
type wrapStore struct {
	*memstore.Store
	// acquireFails: this many Acquire calls fail with ErrNotAssigned.
	acquireFails atomic.Int32
	// watchFails: this many Watch calls fail at once.
	watchFails atomic.Int32
	// lose, when set, replaces Keep: Keep reports the lease lost when it
	// is closed.
	lose chan struct{}
	// delivered is the size of the last snapshot whose callback returned.
	delivered atomic.Int32
}

func (s *wrapStore) Acquire(ctx context.Context, req lease.Request) (lease.Lease, error) {
	if s.acquireFails.Add(-1) >= 0 {
		return lease.Lease{}, fmt.Errorf("node has no podCIDR: %w", lease.ErrNotAssigned)
	}
	return s.Store.Acquire(ctx, req)
}

func (s *wrapStore) Watch(ctx context.Context, fn func(lease.Snapshot)) error {
	if s.watchFails.Add(-1) >= 0 {
		return errors.New("connection refused")
	}
	return s.Store.Watch(ctx, func(sn lease.Snapshot) {
		fn(sn)
		s.delivered.Store(int32(len(sn.Leases)))
	})
}

func (s *wrapStore) Keep(ctx context.Context, own lease.Lease) error {
	if s.lose == nil {
		return s.Store.Keep(ctx, own)
	}
	select {
	case <-ctx.Done():
		return nil
	case <-s.lose:
		return fmt.Errorf("lease %s: %w", own, lease.ErrLeaseLost)
	}
}

func mustConfig(t *testing.T, js string) lease.Config {
	t.Helper()
	cfg, err := lease.ParseConfig([]byte(js))
	require.NoError(t, err)
	return cfg
}

// node describes one test node's agent options.
func nodeOptions(store flannel.LeaseStore, b flannel.Backend, i int) flannel.AgentOptions {
	return flannel.AgentOptions{
		Store:   store,
		Backend: b,
		Iface: flannel.ExternalInterface{
			Name:       "eth0",
			IP:         netip.AddrFrom4([4]byte{192, 0, 2, byte(10 + i)}),
			PublicIP:   netip.AddrFrom4([4]byte{192, 0, 2, byte(10 + i)}),
			IPv6:       netip.MustParseAddr(fmt.Sprintf("2001:db8::%x", 10+i)),
			PublicIPv6: netip.MustParseAddr(fmt.Sprintf("2001:db8::%x", 10+i)),
		},
		Handle:   new(netlink.Handle), // never used by the fake backend
		RetryMin: time.Millisecond,
		RetryMax: 10 * time.Millisecond,
	}
}

// running is an Agent whose Run executes in the background.
type running struct {
	agent  *flannel.Agent
	cancel context.CancelFunc
	done   chan struct{}
	err    error // Run's result, set before done is closed
}

func startAgent(t *testing.T, opts flannel.AgentOptions) *running {
	t.Helper()
	a, err := flannel.NewAgent(opts)
	require.NoError(t, err)
	return runAgent(t, a)
}

func runAgent(t *testing.T, a *flannel.Agent) *running {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	r := &running{agent: a, cancel: cancel, done: make(chan struct{})}
	go func() {
		r.err = a.Run(ctx)
		close(r.done)
	}()
	t.Cleanup(func() { r.stop(t) })
	return r
}

// wait waits for Run to return by itself and returns its error.
func (r *running) wait(t *testing.T) error {
	t.Helper()
	select {
	case <-r.done:
		return r.err
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return")
		return nil
	}
}

// stop cancels Run and waits for it; it returns Run's error.
func (r *running) stop(t *testing.T) error {
	t.Helper()
	r.cancel()
	return r.wait(t)
}

func (r *running) returned() bool {
	select {
	case <-r.done:
		return true
	default:
		return false
	}
}

func (r *running) waitReady(t *testing.T) {
	t.Helper()
	select {
	case <-r.agent.Ready():
	case <-r.done:
		t.Fatalf("Run returned before ready: %v", r.err)
	case <-time.After(30 * time.Second):
		t.Fatal("agent not ready")
	}
}

// eventually polls cond until it holds (10 s at most, no wall-clock
// assertion: the bound only keeps a broken test from hanging).
func eventually(t *testing.T, cond func() bool, msg string, args ...any) {
	t.Helper()
	require.Eventually(t, cond, 10*time.Second, time.Millisecond, append([]any{msg}, args...)...)
}

func subnetsOf(ls []lease.Lease) []netip.Prefix {
	out := make([]netip.Prefix, 0, len(ls))
	for _, l := range ls {
		out = append(out, l.Subnet)
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return out
}
