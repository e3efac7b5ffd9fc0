package e2e

import (
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestVXLANMACSurvivesDeviceLoss: node 0's agent is stopped, its vxlan
// devices are deleted (as after a reboot), and a new agent with a new vxlan
// backend starts on the same store: the devices come back with the MACs of
// the node's previous lease, so the peers' FDB and neighbour entries stay
// valid as they were, and pods reach each other.
func TestVXLANMACSurvivesDeviceLoss(t *testing.T) {
	c := newVXLANCluster(t, families[2], 3)
	c.startAllVXLAN(t)
	pods := c.vxlanPods(t)
	checkAllPairs(t, pods)
	n0 := c.nodes[0]
	before := n0.agent.State().Lease
	// The routes name the device's index, which a new device changes.
	devEntries := func() []string {
		return slices.DeleteFunc(vxlanEntries(t, n0.lab), func(e string) bool { return !strings.HasPrefix(e, "flannel") })
	}
	own := devEntries()
	peers := [][]string{vxlanEntries(t, c.nodes[1].lab), vxlanEntries(t, c.nodes[2].lab)}

	n0.stop(t)
	for _, name := range []string{"flannel.1", "flannel-v6.1"} {
		l, err := n0.lab.Handle.LinkByName(name)
		require.NoError(t, err)
		require.NoError(t, n0.lab.Handle.LinkDel(l), "delete %s", name)
	}
	c.startVXLAN(t, 0)
	c.waitPeers(t, 2)

	after := n0.agent.State().Lease
	assert.True(t, before.SameSubnets(after), "lease %s, was %s", after, before)
	assert.JSONEq(t, string(before.Attrs.BackendData), string(after.Attrs.BackendData), "same v4 VTEP MAC published")
	assert.JSONEq(t, string(before.Attrs.BackendV6Data), string(after.Attrs.BackendV6Data), "same v6 VTEP MAC published")
	assert.ElementsMatch(t, own, devEntries(), "node 0's devices (MACs) and entries restored")
	for i, want := range peers {
		assert.ElementsMatch(t, want, vxlanEntries(t, c.nodes[i+1].lab), "peer %d's entries for node 0 still valid", i+1)
	}
	checkAllPairs(t, pods)
}
