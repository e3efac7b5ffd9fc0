package daemon

import (
	"context"
	"net/http"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/memstore"
)

func TestWedged(t *testing.T) {
	t.Parallel()
	now := time.Date(2026, 11, 25, 12, 0, 0, 0, time.UTC)
	for _, tc := range []struct {
		name  string
		since time.Time
		after time.Duration
		want  bool
	}{
		{"idle", time.Time{}, time.Minute, false},
		{"short apply", now.Add(-time.Second), time.Minute, false},
		{"long apply", now.Add(-2 * time.Minute), time.Minute, true},
		{"check off", now.Add(-time.Hour), 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, got := wedged(flannel.State{ApplyingSince: tc.since}, now, tc.after)
			assert.Equal(t, tc.want, got)
		})
	}
}

// stuckBackend's Apply blocks until ctx ends, as with a hung kernel call.
type stuckBackend struct{ entered chan struct{} }

func (b *stuckBackend) Type() string { return "host-gw" }
func (b *stuckBackend) Prepare(context.Context, flannel.Env) (lease.Attrs, error) {
	return lease.Attrs{BackendType: "host-gw"}, nil
}
func (b *stuckBackend) Start(_ context.Context, own lease.Lease) (flannel.Network, error) {
	return &stuckNetwork{own: own, entered: b.entered}, nil
}
func (b *stuckBackend) Cleanup(context.Context, flannel.Env) error { return nil }

type stuckNetwork struct {
	own     lease.Lease
	entered chan struct{}
}

func (n *stuckNetwork) Lease() lease.Lease { return n.own }
func (n *stuckNetwork) MTU() int           { return 1500 }
func (n *stuckNetwork) Apply(ctx context.Context, _ []lease.Lease) error {
	close(n.entered)
	<-ctx.Done()
	return ctx.Err()
}
func (n *stuckNetwork) Run(ctx context.Context) error { <-ctx.Done(); return nil }

// TestHealthzWedgedApply runs a real Agent whose Apply hangs: /healthz
// turns 500 once it has hung for longer than WedgedAfter.
func TestHealthzWedgedApply(t *testing.T) {
	t.Parallel()
	cfg, err := lease.ParseConfig([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}`))
	require.NoError(t, err)
	b := &stuckBackend{entered: make(chan struct{})}
	h := &netlink.Handle{} // never used: the backend does no kernel work
	a, err := flannel.NewAgent(flannel.AgentOptions{
		Store:   memstore.New(cfg, memstore.Options{}),
		Backend: b,
		Iface:   flannel.ExternalInterface{Name: "eth0", PublicIP: netip.MustParseAddr("192.0.2.10")},
		Handle:  h,
	})
	require.NoError(t, err)
	m := NewMetrics()
	m.WedgedAfter = 50 * time.Millisecond
	m.SetAgent(a)
	handler := m.Handler()

	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	defer func() { cancel(); require.NoError(t, <-done) }()
	<-b.entered

	require.Eventually(t, func() bool {
		code, _ := get(t, handler, "/healthz")
		return code == http.StatusInternalServerError
	}, 30*time.Second, 20*time.Millisecond)
	_, body := get(t, handler, "/healthz")
	assert.Contains(t, body, "wedged")
}

// TestLeaseExpiryCached: scrapes read the lease expiry from the cache; the
// store is asked again only after a renewal or a failed read.
func TestLeaseExpiryCached(t *testing.T) {
	t.Parallel()
	cfg, err := lease.ParseConfig([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}`))
	require.NoError(t, err)
	b := &stuckBackend{entered: make(chan struct{})}
	a, err := flannel.NewAgent(flannel.AgentOptions{
		Store:   memstore.New(cfg, memstore.Options{}),
		Backend: b,
		Iface:   flannel.ExternalInterface{Name: "eth0", PublicIP: netip.MustParseAddr("192.0.2.10")},
		Handle:  &netlink.Handle{},
	})
	require.NoError(t, err)
	m := NewMetrics()
	m.SetAgent(a)
	calls, fail := 0, false
	exp := time.Unix(1_900_000_000, 0)
	m.SetLeaseExpiry(func(_ context.Context, own lease.Lease) (time.Time, error) {
		calls++
		assert.True(t, own.Subnet.IsValid())
		if fail {
			return time.Time{}, assert.AnError
		}
		return exp, nil
	})
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	defer func() { cancel(); require.NoError(t, <-done) }()
	<-b.entered // the lease is held

	handler := m.Handler()
	for range 5 {
		_, body := get(t, handler, "/metrics")
		assert.Contains(t, body, "flannel_lease_expiry_timestamp_seconds 1.9e+09\n")
	}
	assert.Equal(t, 1, calls, "five scrapes, one read")
	m.LeaseRenewed("k")
	fail = true
	_, body := get(t, handler, "/metrics")
	assert.Contains(t, body, "flannel_lease_expiry_timestamp_seconds 0\n")
	fail = false
	get(t, handler, "/metrics")
	get(t, handler, "/metrics")
	assert.Equal(t, 3, calls, "a renewal and a failed read each cost one more read")
}
