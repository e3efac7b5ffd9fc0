package vxlan

import (
	"context"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"go.uber.org/goleak"

	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

// TestRunResyncIsRare: with a ResyncInterval far away, the periodic ticks
// leave an in-sync kernel alone (a neighbour added by someone else, which
// no event reports, stays), while a deleted entry is still repaired at
// once from its kernel event, by a full pass that also removes the
// stranger. Once the subscriptions are gone, every tick repairs again.
func TestRunResyncIsRare(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	c := newCluster(t, netlab.Options{Nodes: 2}, Options{RepairInterval: 5 * time.Millisecond, ResyncInterval: time.Hour})
	n0, n1 := c.Nodes[0], c.Nodes[1]
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- nw(n0).Run(ctx) }()
	defer func() {
		cancel()
		require.NoError(t, <-done)
		goleak.VerifyNone(t, ignore)
	}()
	require.NoError(t, nw(n0).Apply(context.Background(), c.Leases()))
	want := want(c, n0, nil, n1)
	require.Equal(t, want, state(t, n0))
	synced := func() (ok bool) { nw(n0).r.Locked(func() { ok = nw(n0).syncedLocked() }); return ok }
	require.Eventually(t, synced, 30*time.Second, 5*time.Millisecond, "in sync with every subscription open")

	dev, err := n0.Node.Handle.LinkByName("flannel.1")
	require.NoError(t, err)
	stranger := &netlink.Neigh{LinkIndex: dev.Attrs().Index, Family: netlink.FAMILY_V4, State: netlink.NUD_PERMANENT,
		IP: net.ParseIP("10.244.250.1"), HardwareAddr: net.HardwareAddr{0x0a, 0, 0, 0, 0xfa, 1}}
	require.NoError(t, n0.Node.Handle.NeighAdd(stranger))
	hasStranger := func() bool {
		ns, err := nlsafe.Wrap(n0.Node.Handle).NeighList(dev.Attrs().Index, netlink.FAMILY_V4)
		require.NoError(t, err)
		return slices.ContainsFunc(ns, func(n netlink.Neigh) bool { return n.IP.Equal(stranger.IP) })
	}
	// Many ticks (5 ms each) pass; none of them repairs. (A repair for
	// a subscription just opened may still be queued when synced turns
	// true: it runs a full pass, legitimately, and removes the stranger.)
	logs := n0.Logs
	mark := len(logs.String())
	time.Sleep(300 * time.Millisecond)
	var periodic, other int
	for l := range strings.Lines(logs.String()[mark:]) {
		if strings.Contains(l, "msg=repairing") {
			if strings.Contains(l, "trigger=periodic") {
				periodic++
			} else {
				other++
			}
		}
	}
	assert.Zero(t, periodic, "a tick repaired although the kernel is in sync")
	if other == 0 {
		assert.True(t, hasStranger(), "no repair ran, yet the stranger is gone")
	}

	// A deleted route comes back from its event, and that full pass also
	// removes the stranger.
	require.NoError(t, n0.Node.Handle.RouteDel(&netlink.Route{LinkIndex: dev.Attrs().Index, Dst: ipconv.IPNetFromPrefix(n1.Lease.Subnet)}))
	require.Eventually(t, func() bool { return slices.Equal(want, state(t, n0)) && !hasStranger() }, 30*time.Second, 5*time.Millisecond,
		"route restored by its event, stranger removed")
	assert.True(t, logs.HasLine("msg=repairing", `trigger="route event"`), "the repair log names its trigger")

	// A subscription that is not open makes every tick repair.
	nw(n0).watchUp[1].Store(false)
	require.NoError(t, n0.Node.Handle.NeighAdd(stranger))
	require.Eventually(t, func() bool { return !hasStranger() }, 30*time.Second, 5*time.Millisecond, "ticks repair while a subscription is down")
}
