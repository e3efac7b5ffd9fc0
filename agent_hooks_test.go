package flannel_test

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/memstore"
)

// fakeRules records the Agent's calls to its TrafficRules.
type fakeRules struct {
	mu        sync.Mutex
	ensured   []lease.Lease
	cfg       lease.Config
	running   atomic.Int32
	cleaned   int
	ensureErr error
}

var _ flannel.TrafficRules = (*fakeRules)(nil)

func (r *fakeRules) Ensure(ctx context.Context, cfg lease.Config, own lease.Lease) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.ensured = append(r.ensured, own)
	r.cfg = cfg
	return r.ensureErr
}

func (r *fakeRules) Run(ctx context.Context) error {
	r.running.Add(1)
	defer r.running.Add(-1)
	<-ctx.Done()
	return nil
}

func (r *fakeRules) Cleanup(ctx context.Context) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.cleaned++
	return nil
}

func (r *fakeRules) calls() (ensured []lease.Lease, cleaned int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]lease.Lease(nil), r.ensured...), r.cleaned
}

func TestRulesHook(t *testing.T) {
	t.Parallel()
	store := memstore.New(mustConfig(t, v4Conf), memstore.Options{})
	rules := &fakeRules{}
	opts := nodeOptions(store, newFakeBackend(), 1)
	opts.Rules = rules
	var ensuredAtReady atomic.Int32
	opts.OnReady = func(flannel.State) {
		e, _ := rules.calls()
		ensuredAtReady.Store(int32(len(e)))
	}
	r := startAgent(t, opts)
	r.waitReady(t)
	eventually(t, func() bool { return ensuredAtReady.Load() == 1 }, "rules ensured before ready")
	ensured, _ := rules.calls()
	assert.Equal(t, r.agent.State().Lease.Subnet, ensured[0].Subnet)
	assert.Equal(t, "10.244.0.0/16", rules.cfg.Network.String())
	eventually(t, func() bool { return rules.running.Load() == 1 }, "rules Run started")
	require.NoError(t, r.stop(t))
	assert.Equal(t, int32(0), rules.running.Load(), "rules Run joined")

	require.NoError(t, r.agent.Cleanup(t.Context()))
	_, cleaned := rules.calls()
	assert.Equal(t, 1, cleaned)
}

func TestRulesEnsureFailureEndsRun(t *testing.T) {
	t.Parallel()
	store := memstore.New(mustConfig(t, v4Conf), memstore.Options{})
	opts := nodeOptions(store, newFakeBackend(), 2)
	opts.Rules = &fakeRules{ensureErr: errors.New("nft: not found")}
	r := startAgent(t, opts)
	err := r.wait(t)
	require.Error(t, err)
	assert.ErrorContains(t, err, "ensure traffic rules")
	assert.ErrorContains(t, err, "nft: not found")
}

func TestMetricHooks(t *testing.T) {
	t.Parallel()
	store := &wrapStore{Store: memstore.New(mustConfig(t, v4Conf), memstore.Options{}), lose: make(chan struct{})}
	store.watchFails.Store(2)
	var applies, applyErrs, watchRestarts, keepErrs, lost atomic.Int32
	opts := nodeOptions(store, newFakeBackend(), 3)
	opts.OnApply = func(peers int, took time.Duration, err error) {
		applies.Add(1)
		assert.GreaterOrEqual(t, took, time.Duration(0))
		if err != nil {
			applyErrs.Add(1)
		}
	}
	opts.OnWatchRestart = func(err error) { watchRestarts.Add(1) }
	opts.OnKeepError = func(err error) {
		keepErrs.Add(1)
		if errors.Is(err, lease.ErrLeaseLost) {
			lost.Add(1)
		}
	}
	r := startAgent(t, opts)
	r.waitReady(t)
	assert.GreaterOrEqual(t, applies.Load(), int32(1))
	assert.Equal(t, int32(0), applyErrs.Load())
	assert.Equal(t, int32(2), watchRestarts.Load())
	close(store.lose) // every Keep now reports the lease lost
	eventually(t, func() bool { return lost.Load() >= 1 }, "keep error reported")
	assert.GreaterOrEqual(t, keepErrs.Load(), lost.Load())
}
