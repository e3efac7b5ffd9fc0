package backendtest

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/flannelkit/flannel/lease"
)

// never is a repair interval no test reaches: only kernel events repair.
const never = time.Hour

// applyTwice: the second Apply of the same peers changes no kernel entry,
// and the pods reach each other.
func (s suite) applyTwice(t *testing.T) {
	c := s.cluster(t, never, false)
	c.ApplyAll(t)
	n0 := c.Nodes[0]
	d, snap := s.dump(t, n0), Snapshot(t, n0)
	require.NotEmpty(t, d, "Dump shows the programmed peer")
	c.ApplyAll(t)
	assert.Equal(t, d, s.dump(t, n0))
	assert.Equal(t, snap, Snapshot(t, n0), "no kernel entry changed")
	c.CheckAll(t)
}

// stale: entries of a peer that left go at the next Apply, of this Network
// and of a previous run; routes that are not the backend's stay.
func (s suite) stale(t *testing.T) {
	c := s.cluster(t, never, false)
	n0, n1 := c.Nodes[0], c.Nodes[1]
	others := foreign(t, n0, n1)
	apply(t, n0, n0.Lease, n1.Lease)
	want, snap := s.dump(t, n0), Snapshot(t, n0)
	ghost := c.ghost()

	apply(t, n0, n0.Lease, n1.Lease, ghost)
	require.NotEqual(t, want, s.dump(t, n0), "the ghost peer is programmed")
	apply(t, n0, n0.Lease, n1.Lease)
	assert.Equal(t, want, s.dump(t, n0), "the ghost's entries are gone")
	assert.Equal(t, snap, Snapshot(t, n0))

	apply(t, n0, n0.Lease, n1.Lease, ghost)
	s.restartNode(t, c, n0, never)
	apply(t, n0, n0.Lease, n1.Lease)
	assert.Equal(t, want, s.dump(t, n0), "the previous run's entries for the ghost are gone")
	assertContainsAll(t, Snapshot(t, n0), others, "routes that are not the backend's stay")
}

// otherTypes: peers of another backend type are skipped without error.
func (s suite) otherTypes(t *testing.T) {
	c := s.cluster(t, never, false)
	n0, n1 := c.Nodes[0], c.Nodes[1]
	apply(t, n0, n0.Lease, n1.Lease)
	want := s.dump(t, n0)
	other := c.peerLike(n1, 98)
	other.Attrs.BackendType = "other-" + s.f.Type
	apply(t, n0, n0.Lease, other, n1.Lease)
	assert.Equal(t, want, s.dump(t, n0), "the other backend's peer is skipped")
}

// peerError: a peer that cannot be programmed (no public address, no
// backend data) is one *flannel.PeerError naming it; the others are
// programmed; repairs do not warn about it again and again.
func (s suite) peerError(t *testing.T) {
	c := s.cluster(t, never, false)
	n0, n1 := c.Nodes[0], c.Nodes[1]
	RunNetwork(t, n0)
	apply(t, n0, n0.Lease, n1.Lease)
	want := s.dump(t, n0)
	bad := c.peerLike(n1, 97)
	bad.Attrs = lease.Attrs{BackendType: s.f.Type}

	err := n0.Net.Apply(context.Background(), []lease.Lease{n0.Lease, bad, n1.Lease})
	require.Error(t, err)
	pes := peerErrors(err)
	require.Len(t, pes, 1, "one *flannel.PeerError in %v", err)
	assert.Equal(t, bad, pes[0].Lease)
	assert.ErrorContains(t, err, bad.String())
	assert.Equal(t, want, s.dump(t, n0), "the good peer is programmed")

	name := bad.String()
	before := warnings(n0, name)
	for range 3 {
		s.f.Damage[0].Do(t, n0, n1)
		poll(t, func() bool { return slices.Equal(want, s.dump(t, n0)) }, "repaired")
	}
	assert.Equal(t, before, warnings(n0, name), "repairs warn about the peer once per change of its lease:\n%s", n0.Logs.String())
}

// repairs: Run repairs every Damage on kernel events, the pods reach each
// other afterwards, and Run returns nil with every goroutine joined.
func (s suite) repairs(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	c := s.cluster(t, never, false)
	n0, n1 := c.Nodes[0], c.Nodes[1]
	stop := RunNetwork(t, n0)
	c.ApplyAll(t)
	want := s.dump(t, n0)
	for _, d := range s.f.Damage {
		for range 2 {
			d.Do(t, n0, n1)
			poll(t, func() bool { return slices.Equal(want, s.dump(t, n0)) }, "%s repaired", d.Name)
		}
	}
	c.CheckPair(t, n0, n1)
	c.CheckPair(t, n1, n0)
	stop()
	verifyNoLeak(t, ignore)
}

// repairsNoNS: without a namespace handle the timer repairs, and removes
// entries that another Network programmed for a peer not in the set.
func (s suite) repairsNoNS(t *testing.T) {
	ignore := goleak.IgnoreCurrent()
	c := s.cluster(t, 50*time.Millisecond, true)
	n0, n1 := c.Nodes[0], c.Nodes[1]
	stop := RunNetwork(t, n0)
	c.ApplyAll(t)
	want := s.dump(t, n0)
	s.f.Damage[0].Do(t, n0, n1)
	poll(t, func() bool { return slices.Equal(want, s.dump(t, n0)) }, "%s repaired by the timer", s.f.Damage[0].Name)

	intruder := &Node{Node: n0.Node, Env: n0.Env, Backend: s.f.New(t, never), Lease: n0.Lease}
	intruder.Lease = c.Start(t, intruder, 0)
	apply(t, intruder, n0.Lease, n1.Lease, c.ghost())
	poll(t, func() bool { return slices.Equal(want, s.dump(t, n0)) }, "entries for a peer not in the set removed by the timer")
	stop()
	verifyNoLeak(t, ignore)
}

// noRepairBeforeApply: a restarted Network's Run leaves the previous run's
// entries, and damage to them, alone until the first Apply.
func (s suite) noRepairBeforeApply(t *testing.T) {
	c := s.cluster(t, 20*time.Millisecond, false)
	n0, n1 := c.Nodes[0], c.Nodes[1]
	apply(t, n0, n0.Lease, n1.Lease)
	want := s.dump(t, n0)
	apply(t, n0, n0.Lease, n1.Lease, c.ghost())
	s.restartNode(t, c, n0, 20*time.Millisecond)
	RunNetwork(t, n0)
	s.f.Damage[0].Do(t, n0, n1)
	left := s.dump(t, n0)
	require.NotEqual(t, want, left)
	// Many repair intervals and the damage's event pass; nothing changes.
	// (Checked by state, not time: Apply below still finds the ghost.)
	deadline := time.Now().Add(300 * time.Millisecond)
	for time.Now().Before(deadline) {
		require.Equal(t, left, s.dump(t, n0), "repaired before the first Apply")
		time.Sleep(20 * time.Millisecond)
	}
	apply(t, n0, n0.Lease, n1.Lease)
	assert.Equal(t, want, s.dump(t, n0))
}

// cleanup: Cleanup removes what the backend owns and nothing else, and
// may be called again.
func (s suite) cleanup(t *testing.T) {
	c := s.cluster(t, never, false)
	n0, n1 := c.Nodes[0], c.Nodes[1]
	others := foreign(t, n0, n1)
	c.ApplyAll(t)
	ctx := context.Background()
	require.NoError(t, n0.Backend.Cleanup(ctx, n0.Env))
	assert.Empty(t, s.dump(t, n0))
	assertContainsAll(t, Snapshot(t, n0), others, "routes that are not the backend's stay")
	require.NoError(t, n0.Backend.Cleanup(ctx, n0.Env), "again")
	assert.Empty(t, s.dump(t, n0))
	fresh := s.f.New(t, never)
	require.NoError(t, fresh.Cleanup(ctx, n0.Env), "by a Backend that was never prepared")
}

// restart: a new Backend and Network over the kernel state of a running
// one apply the same peers without changing any kernel entry.
func (s suite) restart(t *testing.T) {
	c := s.cluster(t, never, false)
	n0, n1 := c.Nodes[0], c.Nodes[1]
	stop := RunNetwork(t, n0)
	c.ApplyAll(t)
	want, snap := s.dump(t, n0), Snapshot(t, n0)
	stop()
	s.restartNode(t, c, n0, never)
	RunNetwork(t, n0)
	apply(t, n0, c.Leases()...)
	apply(t, n1, c.Leases()...) // n0's lease may carry new attributes
	assert.Equal(t, want, s.dump(t, n0))
	assert.Equal(t, snap, Snapshot(t, n0), "no kernel entry changed")
	c.CheckPair(t, n0, n1)
	c.CheckPair(t, n1, n0)
}
