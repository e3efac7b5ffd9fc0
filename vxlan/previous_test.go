package vxlan

import (
	"context"
	"encoding/json"
	"net"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/lease"
)

// TestMACFromPreviousLease: a new Backend recreating deleted devices takes
// their MACs from the node's previous lease when it is a vxlan lease of the
// same VNI, and only then.
func TestMACFromPreviousLease(t *testing.T) {
	t.Parallel()
	c := newCluster(t, netlab.Options{Nodes: 1, IPv4: true, IPv6: true}, Options{})
	n := c.Nodes[0]
	mac4, mac6 := nw(n).VtepMAC(false), nw(n).VtepMAC(true)
	prev := n.Lease
	pin, _ := net.ParseMAC("0e:00:00:00:00:01")
	other := func(mut func(*lease.Attrs)) lease.Lease {
		l := prev
		mut(&l.Attrs)
		return l
	}
	data := func(vni int, mac net.HardwareAddr) json.RawMessage {
		b, err := json.Marshal(BackendData{VNI: vni, VtepMAC: mac})
		require.NoError(t, err)
		return b
	}

	tests := []struct {
		name  string
		opts  Options
		prev  lease.Lease
		want4 net.HardwareAddr // nil: a new random MAC
		want6 net.HardwareAddr
	}{
		{name: "previous vxlan lease", prev: prev, want4: mac4, want6: mac6},
		{name: "pinned wins", opts: Options{VtepMAC: pin}, prev: prev, want4: pin, want6: mac6},
		{name: "no previous lease"},
		{name: "other backend", prev: other(func(a *lease.Attrs) { a.BackendType = "host-gw" })},
		{name: "other vni", prev: other(func(a *lease.Attrs) {
			a.BackendData, a.BackendV6Data = data(2, mac4), data(2, mac6)
		})},
		{name: "malformed data", prev: other(func(a *lease.Attrs) {
			a.BackendData, a.BackendV6Data = json.RawMessage(`{"VNI":1}`), json.RawMessage(`[]`)
		})},
		{name: "v4 only", prev: other(func(a *lease.Attrs) { a.BackendV6Data = nil }), want4: mac4},
	}
	ctx := context.Background()
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b, err := New(tt.opts)
			require.NoError(t, err)
			require.NoError(t, b.Cleanup(ctx, n.Env))
			env := n.Env
			env.Previous = tt.prev
			attrs, err := b.Prepare(ctx, env)
			require.NoError(t, err)
			for _, fam := range []struct {
				v6   bool
				raw  json.RawMessage
				want net.HardwareAddr
				old  net.HardwareAddr
			}{{false, attrs.BackendData, tt.want4, mac4}, {true, attrs.BackendV6Data, tt.want6, mac6}} {
				d, err := ParseBackendData(fam.raw)
				require.NoError(t, err)
				l, err := n.Node.Handle.LinkByName(deviceName(1, fam.v6))
				require.NoError(t, err)
				assert.Equal(t, d.VtepMAC, l.Attrs().HardwareAddr, "published MAC is the device's")
				if fam.want != nil {
					assert.Equal(t, fam.want, d.VtepMAC, "v6 %v", fam.v6)
				} else {
					assert.NotEqual(t, fam.old, d.VtepMAC, "v6 %v: a new random MAC", fam.v6)
				}
			}
		})
	}
}
