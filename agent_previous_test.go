package flannel_test

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/memstore"
)

// prevBackend records the Env.Previous each Prepare was given.
type prevBackend struct {
	*fakeBackend
	mu   sync.Mutex
	prev []lease.Lease
}

func (b *prevBackend) Prepare(ctx context.Context, env flannel.Env) (lease.Attrs, error) {
	b.mu.Lock()
	b.prev = append(b.prev, env.Previous)
	b.mu.Unlock()
	return b.fakeBackend.Prepare(ctx, env)
}

func (b *prevBackend) previous() []lease.Lease {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]lease.Lease(nil), b.prev...)
}

// failingFinder is a store whose FindOwn fails.
type failingFinder struct{ *memstore.Store }

func (failingFinder) FindOwn(context.Context, lease.Attrs) (lease.Lease, bool, error) {
	return lease.Lease{}, false, errors.New("store unreachable")
}

func TestPreviousLeasePassedToBackend(t *testing.T) {
	t.Parallel()
	cfg := mustConfig(t, v4Conf)
	store := memstore.New(cfg, memstore.Options{})
	opts := nodeOptions(store, newFakeBackend(), 1)

	// No lease yet: Previous is zero.
	b1 := &prevBackend{fakeBackend: newFakeBackend()}
	opts.Backend = b1
	r := startAgent(t, opts)
	r.waitReady(t)
	held := r.agent.State().Lease
	require.NoError(t, r.stop(t))
	require.Equal(t, []lease.Lease{{}}, b1.previous())

	// A new agent and backend on the same store: Previous is the held
	// lease, with the backend data published then.
	b2 := &prevBackend{fakeBackend: newFakeBackend()}
	opts.Backend = b2
	r = startAgent(t, opts)
	r.waitReady(t)
	require.NoError(t, r.stop(t))
	got := b2.previous()
	require.Len(t, got, 1)
	assert.True(t, held.SameSubnets(got[0]), "previous %s, held %s", got[0], held)
	assert.JSONEq(t, `{"Fake":true}`, string(got[0].Attrs.BackendData))
	assert.Equal(t, opts.Iface.PublicIP, got[0].Attrs.PublicIP)

	// Another node (other public IP) gets no previous lease.
	b3 := &prevBackend{fakeBackend: newFakeBackend()}
	r = startAgent(t, nodeOptions(store, b3, 2))
	r.waitReady(t)
	require.NoError(t, r.stop(t))
	assert.Equal(t, []lease.Lease{{}}, b3.previous())

	// A failing lookup is logged and ignored.
	var logs testenv.LogBuffer
	b4 := &prevBackend{fakeBackend: newFakeBackend()}
	opts4 := nodeOptions(failingFinder{store}, b4, 1)
	opts4.Logger = slog.New(slog.NewTextHandler(&logs, nil))
	r = startAgent(t, opts4)
	r.waitReady(t)
	require.NoError(t, r.stop(t))
	assert.Equal(t, []lease.Lease{{}}, b4.previous())
	assert.True(t, held.SameSubnets(r.agent.State().Lease), "the lease is still reclaimed")
	assert.Contains(t, logs.String(), "store unreachable")
}
