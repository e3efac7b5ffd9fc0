package storetest

import (
	"context"
	"errors"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
)

// testAcquireReuse: a node acquiring again (a restart) gets its own lease
// back, with the attributes of the new request published.
func testAcquireReuse(t *testing.T, f Factory) {
	c := f.New(t, NetConf)
	s := c.Store(t, 0, nil)
	first, err := s.Acquire(t.Context(), lease.Request{Attrs: Attrs(0)})
	require.NoError(t, err)
	require.True(t, first.Subnet.IsValid())

	a := Attrs(0)
	a.BackendData = []byte(`{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:ff"}`)
	again, err := c.Store(t, 0, nil).Acquire(t.Context(), lease.Request{Attrs: a})
	require.NoError(t, err)
	assert.True(t, first.SameSubnets(again), "own lease reused: %s then %s", first, again)
	assert.JSONEq(t, string(a.BackendData), string(again.Attrs.BackendData))

	w := Watch(t, s)
	w.WaitFor(t, "the new attributes", func(sn lease.Snapshot) bool {
		for _, l := range sn.Leases {
			if l.SameSubnets(first) {
				return string(l.Attrs.BackendData) == string(a.BackendData)
			}
		}
		return false
	})
}

// testAcquirePrevious: Request.Previous is honoured when free, and a held
// subnet is never handed to another node.
func testAcquirePrevious(t *testing.T, f Factory) {
	c := f.New(t, NetConf)
	if !c.Caps().Allocates {
		t.Log("the store does not allocate subnets: Request.Previous does not apply")
		return
	}
	prev := lease.Lease{Subnet: Subnet(Config(t, NetConf), 7)}
	got, err := c.Store(t, 0, nil).Acquire(t.Context(), lease.Request{Attrs: Attrs(0), Previous: prev})
	require.NoError(t, err)
	assert.Equal(t, prev.Subnet, got.Subnet, "previous subnet reused")
	other, err := c.Store(t, 1, nil).Acquire(t.Context(), lease.Request{Attrs: Attrs(1), Previous: prev})
	require.NoError(t, err)
	assert.NotEqual(t, prev.Subnet, other.Subnet, "a held previous subnet is not handed out again")
}

// testExhaustion: a full network yields lease.ErrNoFreeSubnet, and hostile
// leases (0.0.0.0/1, the whole network) do not count as taken.
func testExhaustion(t *testing.T, f Factory) {
	c := f.New(t, smallConf)
	if !c.Caps().Allocates {
		t.Log("the store does not allocate subnets: exhaustion does not apply")
		return
	}
	c.Write(t, "hostile-wide", lease.Lease{Subnet: netip.MustParsePrefix("0.0.0.0/1"), Attrs: Attrs(9)})
	c.Write(t, "hostile-network", lease.Lease{Subnet: netip.MustParsePrefix("10.67.0.0/24"), Attrs: Attrs(8)})
	seen := map[netip.Prefix]bool{}
	for i := range 3 {
		l, err := c.Store(t, i, nil).Acquire(t.Context(), lease.Request{Attrs: Attrs(i)})
		require.NoError(t, err, "node %d: hostile leases must not exhaust the network", i)
		assert.False(t, seen[l.Subnet], "subnet %s handed out twice", l.Subnet)
		seen[l.Subnet] = true
	}
	_, err := c.Store(t, 3, nil).Acquire(t.Context(), lease.Request{Attrs: Attrs(3)})
	assert.ErrorIs(t, err, lease.ErrNoFreeSubnet)
}

// testNotAssigned: a store that waits for an assignment says so.
func testNotAssigned(t *testing.T, f Factory) {
	c := f.New(t, NetConf)
	un := c.Caps().Unassigned
	if un == nil {
		t.Log("the store assigns subnets itself: it never returns lease.ErrNotAssigned")
		return
	}
	ctx, cancel := context.WithTimeout(t.Context(), 300*time.Millisecond)
	defer cancel()
	_, err := un(t).Acquire(ctx, lease.Request{Attrs: Attrs(0)})
	assert.ErrorIs(t, err, lease.ErrNotAssigned)
}

// testIdentity: how a store knows a node. Address stores use
// lease.Config.Identity: PublicIP when IPv4 is enabled, else PublicIPv6,
// and refuse a request without it; the Kubernetes store uses the Node.
func testIdentity(t *testing.T, f Factory) {
	c := f.New(t, NetConf)
	if !c.Caps().ByAddress {
		s := c.Store(t, 0, nil)
		first, err := s.Acquire(t.Context(), lease.Request{Attrs: Attrs(0)})
		require.NoError(t, err)
		again, err := c.Store(t, 0, nil).Acquire(t.Context(), lease.Request{Attrs: Attrs(5)})
		require.NoError(t, err)
		assert.True(t, first.SameSubnets(again), "the Node, not the address, identifies the node")
		findOwn(t, s, Attrs(7), first)
		return
	}
	t.Run("IPv4", func(t *testing.T) {
		s := c.Store(t, 0, nil)
		first, err := s.Acquire(t.Context(), lease.Request{Attrs: Attrs(0)})
		require.NoError(t, err)
		a := Attrs(0)
		a.PublicIPv6 = Attrs(5).PublicIPv6
		again, err := s.Acquire(t.Context(), lease.Request{Attrs: a})
		require.NoError(t, err)
		assert.True(t, first.SameSubnets(again), "PublicIP identifies the node when IPv4 is enabled")
		findOwn(t, s, lease.Attrs{PublicIP: a.PublicIP}, first)
		noID := Attrs(1)
		noID.PublicIP = netip.Addr{}
		_, err = s.Acquire(t.Context(), lease.Request{Attrs: noID})
		assert.Error(t, err, "no PublicIP in an IPv4 network")
	})
	t.Run("IPv6Only", func(t *testing.T) {
		c6 := f.New(t, ipv6OnlyNet)
		s := c6.Store(t, 0, nil)
		first, err := s.Acquire(t.Context(), lease.Request{Attrs: Attrs(0)})
		require.NoError(t, err)
		require.True(t, first.IPv6Subnet.IsValid())
		a := Attrs(0)
		a.PublicIP = Attrs(5).PublicIP
		again, err := s.Acquire(t.Context(), lease.Request{Attrs: a})
		require.NoError(t, err)
		assert.True(t, first.SameSubnets(again), "PublicIPv6 identifies the node in an IPv6-only network")
		findOwn(t, s, lease.Attrs{PublicIP: Attrs(6).PublicIP, PublicIPv6: a.PublicIPv6}, first)
		noID := Attrs(1)
		noID.PublicIPv6 = netip.Addr{}
		_, err = s.Acquire(t.Context(), lease.Request{Attrs: noID})
		assert.Error(t, err, "no PublicIPv6 in an IPv6-only network")
	})
}

func findOwn(t *testing.T, s flannel.LeaseStore, attrs lease.Attrs, want lease.Lease) {
	t.Helper()
	f, ok := s.(flannel.LeaseFinder)
	if !ok {
		return
	}
	got, found, err := f.FindOwn(t.Context(), attrs)
	require.NoError(t, err)
	require.True(t, found, "FindOwn(%v)", attrs)
	assert.True(t, got.SameSubnets(want), "FindOwn found %s, want %s", got, want)
}

// keep runs s.Keep(own) in the background; the result arrives on the
// channel.
func keep(ctx context.Context, s flannel.LeaseStore, own lease.Lease) <-chan error {
	done := make(chan error, 1)
	go func() { done <- s.Keep(ctx, own) }()
	return done
}

func testKeepDelete(t *testing.T, f Factory) {
	c := f.New(t, NetConf)
	s := c.Store(t, 0, nil)
	own, err := s.Acquire(t.Context(), lease.Request{Attrs: Attrs(0)})
	require.NoError(t, err)
	done := keep(t.Context(), s, own)
	c.Delete(t, 0)
	assert.ErrorIs(t, waitChan(t, done), lease.ErrLeaseLost)
}

func testKeepTakeOver(t *testing.T, f Factory) {
	c := f.New(t, NetConf)
	if !c.Caps().TakeOver {
		t.Log("another node cannot write over this node's lease in this store")
		return
	}
	s := c.Store(t, 0, nil)
	own, err := s.Acquire(t.Context(), lease.Request{Attrs: Attrs(0)})
	require.NoError(t, err)
	done := keep(t.Context(), s, own)
	c.Write(t, "thief", lease.Lease{Subnet: own.Subnet, IPv6Subnet: own.IPv6Subnet, Attrs: Attrs(5)})
	err = waitChan(t, done)
	assert.ErrorIs(t, err, lease.ErrLeaseLost)
}

func testKeepCancel(t *testing.T, f Factory) {
	c := f.New(t, NetConf)
	s := c.Store(t, 0, nil)
	own, err := s.Acquire(t.Context(), lease.Request{Attrs: Attrs(0)})
	require.NoError(t, err)
	ctx, cancel := context.WithCancel(t.Context())
	done := keep(ctx, s, own)
	cancel()
	err = waitChan(t, done)
	assert.NoError(t, err, "Keep returns nil on cancel")
	assert.False(t, errors.Is(err, lease.ErrLeaseLost))
}
