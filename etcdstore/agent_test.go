package etcdstore_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/etcdstore"
	"github.com/flannelkit/flannel/internal/etcdtest"
	"github.com/flannelkit/flannel/internal/storetest"
	"github.com/flannelkit/flannel/lease"
)

// nopBackend is a dataplane that programs nothing, so that the Agent can
// run against etcd without a kernel.
type nopBackend struct{}

func (nopBackend) Type() string { return "vxlan" }

func (nopBackend) Prepare(context.Context, flannel.Env) (lease.Attrs, error) {
	return lease.Attrs{BackendType: "vxlan", BackendData: []byte(`{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:09"}`)}, nil
}

func (nopBackend) Start(_ context.Context, own lease.Lease) (flannel.Network, error) {
	return nopNetwork{own}, nil
}

func (nopBackend) Cleanup(context.Context, flannel.Env) error { return nil }

type nopNetwork struct{ own lease.Lease }

func (n nopNetwork) Lease() lease.Lease                       { return n.own }
func (nopNetwork) MTU() int                                   { return 1450 }
func (nopNetwork) Apply(context.Context, []lease.Lease) error { return nil }
func (nopNetwork) Run(ctx context.Context) error              { <-ctx.Done(); return nil }

func startAgent(t *testing.T, s *etcdstore.Store, i int) (*flannel.Agent, chan error) {
	t.Helper()
	a, err := flannel.NewAgent(flannel.AgentOptions{
		Store:    s,
		Backend:  nopBackend{},
		Iface:    flannel.ExternalInterface{Name: "eth0", IP: nodeIP(i), PublicIP: nodeIP(i)},
		Handle:   new(netlink.Handle), // never used by nopBackend
		RetryMin: 10 * time.Millisecond,
		RetryMax: 100 * time.Millisecond,
	})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			t.Error("Agent.Run did not return after cancel")
		}
	})
	select {
	case <-a.Ready():
	case err := <-done:
		t.Fatalf("agent ended before ready: %v", err)
	case <-time.After(60 * time.Second):
		t.Fatal("agent not ready")
	}
	return a, done
}

func TestAgentReacquiresDeletedLease(t *testing.T) {
	t.Parallel()
	e := newEnv(t, etcdtest.Options{})
	e.putConfig(t, netConf)
	s := e.store(t, nil, etcdstore.Options{})
	a, done := startAgent(t, s, 1)
	own := a.State().Lease
	key := s.LeaseKey(own)
	before, ok := e.get(t, key)
	require.True(t, ok)

	_, err := e.admin.Delete(t.Context(), key)
	require.NoError(t, err)
	var after *clientKV
	storetest.Eventually(t, "the agent to re-create its key", func() bool {
		after, ok = e.get(t, key)
		return ok
	})
	assert.Equal(t, before.Value, after.Value, "same subnet, same attributes")
	select {
	case err := <-done:
		t.Fatalf("agent stopped: %v", err)
	default:
	}
	assert.True(t, a.State().Lease.SameSubnets(own))
	assert.Equal(t, []string{own.Key()}, e.subnetKeys(t))
}

func TestAgentReportsSubnetChange(t *testing.T) {
	t.Parallel()
	e := newEnv(t, etcdtest.Options{})
	e.putConfig(t, netConf)
	s := e.store(t, nil, etcdstore.Options{})
	a, done := startAgent(t, s, 1)
	own := a.State().Lease

	// Another node takes the subnet over.
	_, err := e.admin.Put(t.Context(), s.LeaseKey(own), mustJSON(t, attrs(2)))
	require.NoError(t, err)
	select {
	case err := <-done:
		done <- err // for the cleanup
		require.ErrorIs(t, err, flannel.ErrSubnetChanged)
		var sc *flannel.SubnetChangedError
		require.True(t, errors.As(err, &sc))
		assert.True(t, sc.Old.SameSubnets(own))
		assert.False(t, sc.New.SameSubnets(own))
	case <-time.After(60 * time.Second):
		t.Fatal("agent did not report the subnet change")
	}
}
