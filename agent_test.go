package flannel_test

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/memstore"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const v4Conf = `{"Network":"10.244.0.0/16","Backend":{"Type":"fake"}}`

func TestNewAgentValidates(t *testing.T) {
	t.Parallel()
	store := memstore.New(mustConfig(t, v4Conf), memstore.Options{})
	valid := nodeOptions(store, newFakeBackend(), 0)
	tests := []struct {
		name    string
		mutate  func(o *flannel.AgentOptions)
		wantErr string
	}{
		{name: "valid", mutate: func(o *flannel.AgentOptions) {}},
		{name: "no store", mutate: func(o *flannel.AgentOptions) { o.Store = nil }, wantErr: "Store is required"},
		{name: "no backend", mutate: func(o *flannel.AgentOptions) { o.Backend = nil }, wantErr: "Backend is required"},
		{name: "no handle", mutate: func(o *flannel.AgentOptions) { o.Handle = nil }, wantErr: "Handle is required"},
		{name: "no iface", mutate: func(o *flannel.AgentOptions) { o.Iface = flannel.ExternalInterface{} }, wantErr: "Iface.Name is required"},
		{name: "negative retry", mutate: func(o *flannel.AgentOptions) { o.RetryMin = -1 }, wantErr: "RetryMin"},
		{name: "min above max", mutate: func(o *flannel.AgentOptions) { o.RetryMin, o.RetryMax = 2, 1 }, wantErr: "exceeds RetryMax"},
		{name: "defaults", mutate: func(o *flannel.AgentOptions) { o.RetryMin, o.RetryMax = 0, 0 }},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			o := valid
			tc.mutate(&o)
			a, err := flannel.NewAgent(o)
			if tc.wantErr == "" {
				require.NoError(t, err)
				require.NotNil(t, a)
				return
			}
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.wantErr)
		})
	}
}

// TestRunStopsPromptlyNoLeaks is not parallel so that goleak sees only
// its own goroutines.
func TestRunStopsPromptlyNoLeaks(t *testing.T) {
	store := memstore.New(mustConfig(t, v4Conf), memstore.Options{TTL: time.Second /* Keep renews */})
	var readyState atomic.Pointer[flannel.State]
	opts := nodeOptions(store, newFakeBackend(), 0)
	opts.OnReady = func(s flannel.State) { readyState.Store(&s) }
	r := startAgent(t, opts)
	r.waitReady(t)

	st := r.agent.State()
	assert.True(t, st.Ready)
	assert.Equal(t, 1450, st.MTU)
	assert.Equal(t, 0, st.Peers)
	require.True(t, st.Lease.Subnet.IsValid())
	// OnReady runs after the channel is closed.
	eventually(t, func() bool { return readyState.Load() != nil }, "OnReady called")
	got := readyState.Load()
	assert.True(t, got.Ready)
	assert.Equal(t, st.Lease.Subnet, got.Lease.Subnet)

	require.NoError(t, r.stop(t))
	assert.False(t, r.agent.State().Ready)
	goleak.VerifyNone(t)
}

func TestPeersExcludeOwnAndFollowStore(t *testing.T) {
	t.Parallel()
	store := memstore.New(mustConfig(t, v4Conf), memstore.Options{})
	b1, b2 := newFakeBackend(), newFakeBackend()
	r1 := startAgent(t, nodeOptions(store, b1, 1))
	r1.waitReady(t)
	own1 := r1.agent.State().Lease

	last, ok := b1.lastApply()
	require.True(t, ok)
	assert.Empty(t, last, "own lease is not a peer")
	// The published lease carries the backend's data and the interface's
	// public address, filled in by the agent.
	require.Len(t, store.Leases(), 1)
	pub := store.Leases()[0]
	assert.Equal(t, netip.MustParseAddr("192.0.2.11"), pub.Attrs.PublicIP)
	assert.Equal(t, "fake", pub.Attrs.BackendType)
	assert.JSONEq(t, `{"Fake":true}`, string(pub.Attrs.BackendData))
	assert.False(t, pub.Attrs.PublicIPv6.IsValid(), "IPv6 disabled: no IPv6 published")

	// A second agent appears in the first's peers and vice versa.
	r2 := startAgent(t, nodeOptions(store, b2, 2))
	r2.waitReady(t)
	own2 := r2.agent.State().Lease
	require.False(t, own1.SameSubnets(own2))
	eventually(t, func() bool {
		l, _ := b1.lastApply()
		return len(l) == 1 && l[0].Subnet == own2.Subnet
	}, "agent 1 sees agent 2")
	eventually(t, func() bool {
		l, _ := b2.lastApply()
		return len(l) == 1 && l[0].Subnet == own1.Subnet
	}, "agent 2 sees agent 1")
	eventually(t, func() bool { return r1.agent.State().Peers == 1 }, "state counts peers")

	// A node without an agent joins and vanishes.
	ghost, err := store.Acquire(t.Context(), lease.Request{Attrs: lease.Attrs{PublicIP: netip.MustParseAddr("192.0.2.99")}})
	require.NoError(t, err)
	eventually(t, func() bool {
		l, _ := b1.lastApply()
		return assert.ObjectsAreEqual(subnetsOf([]lease.Lease{own2, ghost}), subnetsOf(l))
	}, "ghost added")
	require.True(t, store.Remove(ghost.Subnet))
	eventually(t, func() bool {
		l, _ := b1.lastApply()
		return assert.ObjectsAreEqual([]netip.Prefix{own2.Subnet}, subnetsOf(l))
	}, "ghost removed")

	// Agent 2 stops and releases its lease: agent 1 has no peers left.
	require.NoError(t, r2.stop(t))
	require.NoError(t, r2.agent.Cleanup(t.Context()))
	eventually(t, func() bool {
		l, _ := b1.lastApply()
		return len(l) == 0
	}, "agent 2 gone")
	assert.False(t, r1.returned())
}

func TestRestartKeepsLease(t *testing.T) {
	t.Parallel()
	cfg := mustConfig(t, v4Conf)
	dir := t.TempDir()
	subnetFile := filepath.Join(dir, "subnet.env")

	store := memstore.New(cfg, memstore.Options{})
	b := newFakeBackend()
	opts := nodeOptions(store, b, 3)
	opts.SubnetFile = subnetFile
	a, err := flannel.NewAgent(opts)
	require.NoError(t, err)

	// First run, then a restart of the same agent: the store reclaims the
	// lease by public IP.
	r := runAgent(t, a)
	r.waitReady(t)
	first := a.State().Lease
	firstReady := a.Ready()
	require.NoError(t, r.stop(t))

	r = runAgent(t, a)
	r.waitReady(t)
	assert.True(t, first.SameSubnets(a.State().Lease))
	assert.NotEqual(t, fmt.Sprint(firstReady), fmt.Sprint(a.Ready()), "a new Ready channel per Run")
	require.NoError(t, r.stop(t))
	assert.Equal(t, 2, b.preparedCount())

	// A new process with a fresh store (the lease is gone): the previous
	// subnet is read back from subnet.env.
	store2 := memstore.New(cfg, memstore.Options{})
	opts2 := nodeOptions(store2, newFakeBackend(), 3)
	opts2.SubnetFile = subnetFile
	r = startAgent(t, opts2)
	r.waitReady(t)
	assert.True(t, first.SameSubnets(r.agent.State().Lease), "previous subnet from subnet.env")
	require.NoError(t, r.stop(t))

	// An unreadable subnet.env is ignored.
	require.NoError(t, os.WriteFile(subnetFile, []byte("FLANNEL_SUBNET=garbage\n"), 0o644))
	opts3 := nodeOptions(memstore.New(cfg, memstore.Options{}), newFakeBackend(), 3)
	opts3.SubnetFile = subnetFile
	r = startAgent(t, opts3)
	r.waitReady(t)
	require.NoError(t, r.stop(t))
}

func TestSubnetFileWrittenByAgent(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		conf string
		want func(l lease.Lease) string
	}{
		{
			name: "ipv4",
			conf: `{"Network":"10.244.0.0/16","Backend":{"Type":"fake"}}`,
			want: func(l lease.Lease) string {
				return fmt.Sprintf("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=%s/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n", l.Subnet.Addr().Next())
			},
		},
		{
			name: "ipv6",
			conf: `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"fake"}}`,
			want: func(l lease.Lease) string {
				return fmt.Sprintf("FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=%s/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n", l.IPv6Subnet.Addr().Next())
			},
		},
		{
			name: "dual stack",
			conf: `{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"fake"}}`,
			want: func(l lease.Lease) string {
				return fmt.Sprintf("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=%s/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=%s/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
					l.Subnet.Addr().Next(), l.IPv6Subnet.Addr().Next())
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			store := memstore.New(mustConfig(t, tc.conf), memstore.Options{})
			opts := nodeOptions(store, newFakeBackend(), 4)
			opts.SubnetFile = filepath.Join(t.TempDir(), "run", "flannel", "subnet.env")
			opts.IPMasq = true
			r := startAgent(t, opts)
			r.waitReady(t)
			own := r.agent.State().Lease
			got, err := os.ReadFile(opts.SubnetFile)
			require.NoError(t, err)
			assert.Equal(t, tc.want(own), string(got))

			// Cleanup removes the file, releases the lease and calls the
			// backend's Cleanup.
			require.ErrorIs(t, r.agent.Cleanup(t.Context()), flannel.ErrAgentRunning)
			require.NoError(t, r.stop(t))
			require.NoError(t, r.agent.Cleanup(t.Context()))
			assert.NoFileExists(t, opts.SubnetFile)
			assert.Empty(t, store.Leases())
			assert.Equal(t, 1, opts.Backend.(*fakeBackend).cleanedCount())
			require.NoError(t, r.agent.Cleanup(t.Context()), "cleanup again")
		})
	}
}

func TestLeaseLostSameSubnetContinues(t *testing.T) {
	t.Parallel()
	store := memstore.New(mustConfig(t, v4Conf), memstore.Options{})
	b := newFakeBackend()
	r := startAgent(t, nodeOptions(store, b, 5))
	r.waitReady(t)
	own := r.agent.State().Lease

	require.True(t, store.Remove(own.Subnet))
	// The agent re-acquires the same subnet and keeps running.
	eventually(t, func() bool {
		ls := store.Leases()
		return len(ls) == 1 && ls[0].SameSubnets(own) && ls[0].Attrs.PublicIP == own.Attrs.PublicIP
	}, "lease re-acquired")
	assert.False(t, r.returned(), "Run continues")
	assert.True(t, r.agent.State().Lease.SameSubnets(own))
	assert.Equal(t, 1, b.started(), "backend not restarted")

	// And it keeps holding it: a second loss is handled the same way.
	require.True(t, store.Remove(own.Subnet))
	eventually(t, func() bool { return len(store.Leases()) == 1 }, "lease re-acquired again")
	assert.False(t, r.returned())
}

func TestLeaseLostSubnetTaken(t *testing.T) {
	t.Parallel()
	inner := memstore.New(mustConfig(t, v4Conf), memstore.Options{})
	store := &wrapStore{Store: inner, lose: make(chan struct{})}
	b := newFakeBackend()
	r := startAgent(t, nodeOptions(store, b, 6))
	r.waitReady(t)
	own := r.agent.State().Lease

	// The node's lease vanishes and another node takes the subnet before
	// this one notices.
	require.True(t, inner.Remove(own.Subnet))
	other, err := inner.Acquire(t.Context(), lease.Request{
		Attrs:    lease.Attrs{PublicIP: netip.MustParseAddr("192.0.2.200")},
		Previous: own,
	})
	require.NoError(t, err)
	require.True(t, other.SameSubnets(own))
	close(store.lose)

	err = r.wait(t)
	require.Error(t, err)
	assert.ErrorIs(t, err, flannel.ErrSubnetChanged)
	assert.ErrorIs(t, err, lease.ErrLeaseLost)
	var sc *flannel.SubnetChangedError
	require.ErrorAs(t, err, &sc)
	assert.True(t, sc.Old.SameSubnets(own))
	assert.False(t, sc.New.SameSubnets(own))
	assert.True(t, sc.New.Subnet.IsValid())
	// Nothing was reprogrammed: the backend was started once, with the old
	// lease, and the agent still reports it.
	assert.Equal(t, 1, b.started())
	assert.True(t, r.agent.State().Lease.SameSubnets(own))
}

func TestApplyErrorsRetried(t *testing.T) {
	t.Parallel()
	t.Run("whole apply fails", func(t *testing.T) {
		t.Parallel()
		store := memstore.New(mustConfig(t, v4Conf), memstore.Options{})
		b := newFakeBackend()
		b.apply = func(ctx context.Context, n int, peers []lease.Lease) error {
			if n < 3 {
				return errors.New("netlink: no buffer space available")
			}
			return nil
		}
		r := startAgent(t, nodeOptions(store, b, 7))
		r.waitReady(t) // only after a successful Apply
		assert.GreaterOrEqual(t, len(b.applies()), 4)
	})
	t.Run("per peer errors", func(t *testing.T) {
		t.Parallel()
		store := memstore.New(mustConfig(t, v4Conf), memstore.Options{})
		peer, err := store.Acquire(t.Context(), lease.Request{Attrs: lease.Attrs{PublicIP: netip.MustParseAddr("192.0.2.201")}})
		require.NoError(t, err)
		b := newFakeBackend()
		var failing atomic.Bool
		failing.Store(true)
		b.apply = func(ctx context.Context, n int, peers []lease.Lease) error {
			if !failing.Load() {
				return nil
			}
			var errs []error
			for _, p := range peers {
				errs = append(errs, &flannel.PeerError{Lease: p, Err: errors.New("network unreachable")})
			}
			return errors.Join(errs...)
		}
		r := startAgent(t, nodeOptions(store, b, 8))
		// Ready even though the peer failed: the node itself is up.
		r.waitReady(t)
		assert.Equal(t, 1, r.agent.State().Peers)
		first, _ := b.lastApply()
		assert.Equal(t, []netip.Prefix{peer.Subnet}, subnetsOf(first))
		// The peer is retried until it succeeds, without any store change.
		eventually(t, func() bool { return len(b.applies()) >= 3 }, "retried")
		failing.Store(false)
		n := len(b.applies())
		eventually(t, func() bool { return len(b.applies()) > n }, "retried after recovery")
		assert.Equal(t, 1, r.agent.State().Peers)
	})
}

func TestNewSnapshotNotDelayedByBackoff(t *testing.T) {
	t.Parallel()
	store := memstore.New(mustConfig(t, v4Conf), memstore.Options{})
	bad, err := store.Acquire(t.Context(), lease.Request{Attrs: lease.Attrs{PublicIP: netip.MustParseAddr("192.0.2.210")}})
	require.NoError(t, err)
	b := newFakeBackend()
	b.apply = func(ctx context.Context, n int, peers []lease.Lease) error {
		for _, p := range peers {
			if p.SameSubnets(bad) {
				return &flannel.PeerError{Lease: p, Err: errors.New("no route to host")}
			}
		}
		return nil
	}
	opts := nodeOptions(store, b, 14)
	opts.RetryMin, opts.RetryMax = time.Hour, time.Hour // no retry within the test
	r := startAgent(t, opts)
	r.waitReady(t)

	// A node joins while the failing peer waits for its retry: it is
	// programmed at once, not after the backoff.
	joined, err := store.Acquire(t.Context(), lease.Request{Attrs: lease.Attrs{PublicIP: netip.MustParseAddr("192.0.2.211")}})
	require.NoError(t, err)
	eventually(t, func() bool {
		l, _ := b.lastApply()
		return assert.ObjectsAreEqual(subnetsOf([]lease.Lease{bad, joined}), subnetsOf(l))
	}, "new peer applied despite pending retry")
}

func TestWatchErrorsAndUnassignedRetried(t *testing.T) {
	t.Parallel()
	store := &wrapStore{Store: memstore.New(mustConfig(t, v4Conf), memstore.Options{})}
	store.watchFails.Store(3)
	store.acquireFails.Store(2)
	r := startAgent(t, nodeOptions(store, newFakeBackend(), 9))
	r.waitReady(t)
	assert.Less(t, store.watchFails.Load(), int32(0))
	assert.Less(t, store.acquireFails.Load(), int32(0))
}

func TestSlowApplyDoesNotBlockWatch(t *testing.T) {
	t.Parallel()
	inner := memstore.New(mustConfig(t, v4Conf), memstore.Options{})
	store := &wrapStore{Store: inner}
	b := newFakeBackend()
	entered := make(chan struct{})
	release := make(chan struct{})
	b.apply = func(ctx context.Context, n int, peers []lease.Lease) error {
		if n == 0 {
			close(entered)
			select {
			case <-release:
			case <-ctx.Done():
			}
		}
		return nil
	}
	r := startAgent(t, nodeOptions(store, b, 10))
	<-entered
	assert.False(t, r.agent.State().ApplyingSince.IsZero(), "State says an Apply is running (health checks spot a wedged one)")

	// While the first Apply is stuck, ten nodes join; every watch callback
	// returns (the agent stores the snapshot and moves on).
	var want []lease.Lease
	for i := range 10 {
		l, err := inner.Acquire(t.Context(), lease.Request{Attrs: lease.Attrs{PublicIP: netip.AddrFrom4([4]byte{198, 51, 100, byte(i + 1)})}})
		require.NoError(t, err)
		want = append(want, l)
	}
	eventually(t, func() bool { return store.delivered.Load() == 11 }, "watch callbacks returned while Apply blocks")

	close(release)
	r.waitReady(t)
	eventually(t, func() bool { return len(b.applies()) == 2 }, "one more Apply")
	applies := b.applies()
	assert.Equal(t, subnetsOf(want), subnetsOf(applies[1]), "the latest snapshot wins")
	eventually(t, func() bool { return r.agent.State().Peers == 10 }, "state counts the applied peers")
	assert.True(t, r.agent.State().ApplyingSince.IsZero(), "no Apply running")
}

func TestRunTwiceConcurrently(t *testing.T) {
	t.Parallel()
	store := memstore.New(mustConfig(t, v4Conf), memstore.Options{})
	r := startAgent(t, nodeOptions(store, newFakeBackend(), 11))
	r.waitReady(t)
	assert.ErrorIs(t, r.agent.Run(t.Context()), flannel.ErrAgentRunning)
	assert.False(t, r.returned())
}

func TestRunConfigErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		conf string
	}{
		{name: "backend type mismatch", conf: `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			store := memstore.New(mustConfig(t, tc.conf), memstore.Options{})
			a, err := flannel.NewAgent(nodeOptions(store, newFakeBackend(), 12))
			require.NoError(t, err)
			err = a.Run(t.Context())
			require.Error(t, err)
			assert.ErrorIs(t, err, lease.ErrInvalidConfig)
			assert.Contains(t, err.Error(), "vxlan")
			assert.Empty(t, store.Leases(), "no lease taken")
		})
	}

	t.Run("network full", func(t *testing.T) {
		t.Parallel()
		store := memstore.New(mustConfig(t, `{"Network":"10.20.0.0/28","SubnetLen":30,"Backend":{"Type":"fake"}}`), memstore.Options{})
		for i := range 3 {
			_, err := store.Acquire(t.Context(), lease.Request{Attrs: lease.Attrs{PublicIP: netip.AddrFrom4([4]byte{198, 51, 100, byte(i + 1)})}})
			require.NoError(t, err)
		}
		a, err := flannel.NewAgent(nodeOptions(store, newFakeBackend(), 13))
		require.NoError(t, err)
		assert.ErrorIs(t, a.Run(t.Context()), lease.ErrNoFreeSubnet)
	})
}
