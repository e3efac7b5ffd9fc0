package storetest

import (
	"context"
	"encoding/json"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
)

// Grants is implemented by a Cluster whose leases hang on grants of the
// server (etcd leases): Grant returns node i's current grant, Revoked
// whether a grant is gone.
type Grants interface {
	Grant(t *testing.T, i int) int64
	Revoked(t *testing.T, grant int64) bool
}

// testRepublish: a running backend publishes new data (Env.Publish, as
// ipsec does on a rekey) through a real Agent; other nodes' watches see
// the new data on the same subnet, and a store with grants moves the lease
// to a new grant and revokes the old one.
func testRepublish(t *testing.T, f Factory) {
	c := f.New(t, NetConf)
	b := &publisher{data: mac(0)}
	a, err := flannel.NewAgent(flannel.AgentOptions{
		Store: c.Store(t, 0, nil), Backend: b, Handle: &netlink.Handle{}, // the backend does no kernel work
		Iface: flannel.ExternalInterface{Name: "eth0", PublicIP: Attrs(0).PublicIP, PublicIPv6: Attrs(0).PublicIPv6},
	})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	defer func() { cancel(); require.NoError(t, <-done) }()
	waitChan(t, a.Ready())
	own := a.State().Lease

	w := Watch(t, c.Store(t, 1, nil))
	defer w.Stop(t)
	w.WaitFor(t, "node 0 with its first data", hasData(own.Subnet, mac(0)))
	var before int64
	grants, ok := c.(Grants)
	if ok {
		before = grants.Grant(t, 0)
	}
	b.publishFn()(lease.Attrs{BackendType: b.Type(), BackendData: json.RawMessage(mac(1))})
	w.WaitFor(t, "node 0 with its new data, same subnet", hasData(own.Subnet, mac(1)))
	Eventually(t, "the agent's own lease has the new data", func() bool {
		return string(a.State().Lease.Attrs.BackendData) == mac(1)
	})
	assert.Equal(t, own.Subnet, a.State().Lease.Subnet)
	if ok {
		Eventually(t, "the old grant is revoked", func() bool { return grants.Revoked(t, before) })
		assert.NotEqual(t, before, grants.Grant(t, 0), "the lease is on a new grant")
	}
}

func mac(i int) string { return `{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4c:0` + string(rune('0'+i)) + `"}` }

func hasData(subnet interface{ String() string }, data string) func(lease.Snapshot) bool {
	return func(sn lease.Snapshot) bool {
		for _, l := range sn.Leases {
			if l.Subnet.String() == subnet.String() && string(l.Attrs.BackendData) == data {
				return true
			}
		}
		return false
	}
}

// publisher is a backend without a dataplane that keeps Env.Publish.
type publisher struct {
	data    string
	mu      sync.Mutex
	publish func(lease.Attrs)
}

func (b *publisher) Type() string { return "vxlan" }

func (b *publisher) Prepare(_ context.Context, env flannel.Env) (lease.Attrs, error) {
	b.mu.Lock()
	b.publish = env.Publish
	b.mu.Unlock()
	return lease.Attrs{BackendType: b.Type(), BackendData: json.RawMessage(b.data)}, nil
}

func (b *publisher) publishFn() func(lease.Attrs) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.publish
}

func (b *publisher) Start(_ context.Context, own lease.Lease) (flannel.Network, error) {
	return idle{own}, nil
}

func (b *publisher) Cleanup(context.Context, flannel.Env) error { return nil }

// idle is a Network that programs nothing.
type idle struct{ own lease.Lease }

func (n idle) Lease() lease.Lease                         { return n.own }
func (n idle) MTU() int                                   { return 1500 }
func (n idle) Apply(context.Context, []lease.Lease) error { return nil }
func (n idle) Run(ctx context.Context) error              { <-ctx.Done(); return nil }
