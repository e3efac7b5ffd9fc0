package vxlan

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/internal/netlab"
)

func TestPodConnectivity(t *testing.T) {
	tests := []struct {
		name string
		opts netlab.Options
	}{
		{name: "ipv4", opts: netlab.Options{Nodes: 3, IPv4: true}},
		{name: "ipv6", opts: netlab.Options{Nodes: 3, IPv6: true}},
		{name: "dual-stack", opts: netlab.Options{Nodes: 3, IPv4: true, IPv6: true}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			c := newCluster(t, tc.opts, Options{})
			c.applyAll(t)
			for _, n := range c.nodes {
				assert.Equal(t, c.want(n, nil, c.nodes...), state(t, n), "entries on %s", n.node.Name)
				if !c.v6 {
					assert.Equal(t, 1450, n.net.MTU())
				} else {
					assert.Equal(t, 1430, n.net.MTU())
				}
			}
			before := map[bool]uint64{}
			for _, v6 := range []bool{false, true} {
				if (v6 && c.v6) || (!v6 && c.v4) {
					before[v6] = txPackets(t, c.nodes[0], v6)
				}
			}
			c.checkAll(t)
			// The traffic went through the VXLAN devices.
			for v6, b := range before {
				assert.Greater(t, txPackets(t, c.nodes[0], v6), b+4, "tx packets on the v6=%t device", v6)
			}
			// Applying the same set again changes nothing.
			st := state(t, c.nodes[0])
			c.applyAll(t)
			require.Equal(t, st, state(t, c.nodes[0]))
		})
	}
}
