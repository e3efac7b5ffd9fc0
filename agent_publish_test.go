package flannel_test

import (
	"context"
	"encoding/json"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/memstore"
)

// pubBackend keeps the Env.Publish its last Prepare was given, as a
// backend that rekeys (ipsec) does.
type pubBackend struct {
	*fakeBackend
	mu      sync.Mutex
	publish func(lease.Attrs)
}

func (b *pubBackend) Prepare(ctx context.Context, env flannel.Env) (lease.Attrs, error) {
	b.mu.Lock()
	b.publish = env.Publish
	b.mu.Unlock()
	attrs, err := b.fakeBackend.Prepare(ctx, env)
	attrs.BackendData = json.RawMessage(`{"Key":"k1"}`)
	return attrs, err
}

func (b *pubBackend) publishFn() func(lease.Attrs) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.publish
}

// TestBackendPublishesNewAttrs: attributes a running backend publishes
// reach the store with the same subnet, survive the store's renewals (Keep
// restarts with them), and show in State.
func TestBackendPublishesNewAttrs(t *testing.T) {
	t.Parallel()
	store := memstore.New(mustConfig(t, v4Conf), memstore.Options{TTL: time.Second, RenewInterval: 10 * time.Millisecond})
	b := &pubBackend{fakeBackend: newFakeBackend()}
	r := startAgent(t, nodeOptions(store, b, 1))
	r.waitReady(t)
	before := r.agent.State().Lease
	require.JSONEq(t, `{"Key":"k1"}`, string(before.Attrs.BackendData))

	publish := b.publishFn()
	require.NotNil(t, publish, "the Agent gives backends a Publish function")
	publish(lease.Attrs{BackendType: "fake", BackendData: json.RawMessage(`{"Key":"stale"}`)})
	publish(lease.Attrs{BackendType: "fake", BackendData: json.RawMessage(`{"Key":"k2"}`)}) // latest wins

	stored := func() lease.Lease {
		for _, l := range store.Leases() {
			if l.SameSubnets(before) {
				return l
			}
		}
		return lease.Lease{}
	}
	eventually(t, func() bool { return string(stored().Attrs.BackendData) == `{"Key":"k2"}` }, "new attributes in the store")
	eventually(t, func() bool { return string(r.agent.State().Lease.Attrs.BackendData) == `{"Key":"k2"}` }, "new attributes in State")
	got := stored()
	assert.Equal(t, before.Subnet, got.Subnet, "same subnet")
	assert.Equal(t, before.Attrs.PublicIP, got.Attrs.PublicIP, "public IP filled in by the agent")

	// Renewals keep the new attributes (Keep restarted with the new lease).
	time.Sleep(100 * time.Millisecond)
	assert.JSONEq(t, `{"Key":"k2"}`, string(stored().Attrs.BackendData))
	require.NoError(t, r.stop(t))
}
