package kubestore_test

import (
	"context"
	"encoding/json"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/internal/kubetest"
	"github.com/flannelkit/flannel/kubestore"
	"github.com/flannelkit/flannel/lease"
)

// TestFindOwn: FindOwn reads this node's lease back from its Node, without
// writing, and reports false for a Node that is missing or not a flannel
// node yet.
func TestFindOwn(t *testing.T) {
	srv := kubetest.NewT(t, kubetest.Options{})
	cs := kubetest.ClientT(t, srv.AdminConfig())
	ctx := context.Background()

	createNode(t, cs, "find-held", nil, "10.244.30.0/24", "fd00:10:244:30::/64")
	attrs := vxlanAttrs
	attrs.PublicIPv6 = netip.MustParseAddr("fd00::30")
	attrs.BackendV6Data = json.RawMessage(`{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:30"}`)
	held, err := newStore(t, cs, "find-held", netConfDual, kubestore.Options{}).Acquire(ctx, lease.Request{Attrs: attrs})
	require.NoError(t, err)

	createNode(t, cs, "find-unmanaged", nil, "10.244.31.0/24")
	createNode(t, cs, "find-malformed", map[string]string{
		pfx + "kube-subnet-manager": "true",
		pfx + "public-ip":           "not-an-ip",
		pfx + "backend-data":        `{"VNI":1}`,
	}, "10.244.32.0/24")

	tests := []struct {
		node, conf string
		found      bool
		wantErr    string
	}{
		{node: "find-held", conf: netConfDual, found: true},
		{node: "find-missing", conf: netConf4},
		{node: "find-unmanaged", conf: netConf4},
		{node: "find-malformed", conf: netConf4, wantErr: "public-ip"},
	}
	for _, tt := range tests {
		t.Run(tt.node, func(t *testing.T) {
			s := newStore(t, cs, tt.node, tt.conf, kubestore.Options{})
			var rv string
			if tt.node != "find-missing" {
				rv = getNode(t, cs, tt.node).ResourceVersion
			}
			// attrs are not used: the Node is the store's.
			l, found, err := s.FindOwn(ctx, lease.Attrs{})
			if tt.wantErr != "" {
				require.ErrorContains(t, err, tt.wantErr)
				return
			}
			require.NoError(t, err)
			require.Equal(t, tt.found, found)
			if rv != "" {
				assert.Equal(t, rv, getNode(t, cs, tt.node).ResourceVersion, "FindOwn must not write")
			}
			if !found {
				assert.Zero(t, l)
				return
			}
			assert.True(t, held.SameSubnets(l))
			assert.Equal(t, attrs.PublicIP, l.Attrs.PublicIP)
			assert.Equal(t, attrs.PublicIPv6, l.Attrs.PublicIPv6)
			assert.Equal(t, "vxlan", l.Attrs.BackendType)
			assert.JSONEq(t, string(attrs.BackendData), string(l.Attrs.BackendData))
			assert.JSONEq(t, string(attrs.BackendV6Data), string(l.Attrs.BackendV6Data))
		})
	}
}
