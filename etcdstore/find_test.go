package etcdstore_test

import (
	"context"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/etcdstore"
	"github.com/flannelkit/flannel/internal/etcdtest"
	"github.com/flannelkit/flannel/lease"
)

func TestFindOwn(t *testing.T) {
	t.Parallel()
	e := newEnv(t, etcdtest.Options{})
	e.putConfig(t, netConf)
	ctx := t.Context()
	s := e.store(t, nil, etcdstore.Options{})

	// The other keys are written first: Acquire then cannot pick (and the
	// puts overwrite) one of their subnets.
	// A lease that no longer fits the network is not found (Acquire would
	// drop it), nor is a malformed value.
	_, err := e.admin.Put(ctx, e.prefix+"/subnets/10.99.0.0-24", `{"PublicIP":"192.168.0.3","BackendType":"vxlan"}`)
	require.NoError(t, err)
	_, err = e.admin.Put(ctx, e.prefix+"/subnets/10.244.9.0-24", `not json`)
	require.NoError(t, err)
	// A reservation is what Acquire takes first.
	_, err = e.admin.Put(ctx, e.prefix+"/subnets/10.244.7.0-24", `{"PublicIP":"192.168.0.5","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:05"}}`)
	require.NoError(t, err)
	_, err = e.admin.Put(ctx, e.prefix+"/subnets/10.244.8.0-24", `{"PublicIP":"192.168.0.5","BackendType":"vxlan"}`)
	require.NoError(t, err)
	held, err := s.Acquire(ctx, lease.Request{Attrs: attrs(1)})
	require.NoError(t, err)
	before := e.subnetKeys(t)

	tests := []struct {
		name  string
		attrs lease.Attrs
		key   string // "" when not found
		data  string
	}{
		{"own lease", lease.Attrs{PublicIP: nodeIP(1)}, held.Key(), `{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:01"}`},
		{"reservation first", lease.Attrs{PublicIP: nodeIP(4)}, "10.244.7.0-24", `{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:05"}`},
		{"lease outside the network", lease.Attrs{PublicIP: nodeIP(2)}, "", ""},
		{"unknown node", lease.Attrs{PublicIP: nodeIP(9)}, "", ""},
		{"no public ip", lease.Attrs{}, "", ""},
		{"other family", lease.Attrs{PublicIPv6: netip.MustParseAddr("fd00::1")}, "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, found, err := s.FindOwn(ctx, tt.attrs)
			require.NoError(t, err)
			require.Equal(t, tt.key != "", found, "found %s", l)
			if !found {
				assert.Zero(t, l)
				return
			}
			assert.Equal(t, tt.key, l.Key())
			assert.JSONEq(t, tt.data, string(l.Attrs.BackendData))
		})
	}
	assert.Equal(t, before, e.subnetKeys(t), "FindOwn changes nothing")
	kv, ok := e.get(t, s.LeaseKey(held))
	require.True(t, ok)
	assert.NotZero(t, kv.Lease)

	cctx, cancel := context.WithCancel(ctx)
	cancel()
	_, _, err = s.FindOwn(cctx, attrs(1))
	assert.Error(t, err)
}
