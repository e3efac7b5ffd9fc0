package hostgw

import (
	"context"
	"encoding/json"
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/lease"
)

func TestFromConfig(t *testing.T) {
	tests := []struct {
		name    string
		typ     string
		raw     string
		wantErr string
		ignored []string
	}{
		{name: "no backend object", typ: "host-gw"},
		{name: "type only", typ: "host-gw", raw: `{"Type":"host-gw"}`},
		{name: "type key in lower case", typ: "host-gw", raw: `{"type":"host-gw"}`},
		{name: "null", typ: "host-gw", raw: `null`},
		{name: "unknown key named", typ: "host-gw", raw: `{"Type":"host-gw","DirectRouting":true}`, wantErr: "Backend.DirectRouting: unknown key"},
		{name: "windows keys accepted", typ: "host-gw", raw: `{"Type":"host-gw","Name":"cbr0","dnsServerList":"10.0.0.10"}`, ignored: []string{"DNSServerList", "Name"}},
		{name: "other type", typ: "vxlan", raw: `{"Type":"vxlan"}`, wantErr: `Backend.Type "vxlan" is not "host-gw"`},
		{name: "not an object", typ: "host-gw", raw: `[1]`, wantErr: "Backend:"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b, err := FromConfig(lease.Config{BackendType: tc.typ, Backend: json.RawMessage(tc.raw)})
			if tc.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tc.wantErr)
				assert.ErrorIs(t, err, lease.ErrInvalidConfig)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, "host-gw", b.Type())
			assert.Equal(t, DefaultRepairInterval, b.(*Backend).opts.RepairInterval)
			assert.Equal(t, tc.ignored, b.(*Backend).opts.Ignored)
		})
	}
}

func TestRegistryBuildsHostGW(t *testing.T) {
	r := backend.NewRegistry()
	require.NoError(t, r.Register(Type, FromConfig))
	b, err := r.New(lease.Config{BackendType: "host-gw", Backend: json.RawMessage(`{"Type":"host-gw"}`)})
	require.NoError(t, err)
	assert.Equal(t, "host-gw", b.Type())
	_, err = r.New(lease.Config{BackendType: "host-gw", Backend: json.RawMessage(`{"Type":"host-gw","Port":8472}`)})
	assert.ErrorContains(t, err, "Backend.Port")
}

func TestPrepareAndStartPreconditions(t *testing.T) {
	ctx := context.Background()
	b, err := New(Options{})
	require.NoError(t, err)
	_, err = b.Prepare(ctx, flannel.Env{})
	assert.ErrorContains(t, err, "no netlink handle")
	_, err = b.Start(ctx, lease.Lease{})
	assert.ErrorContains(t, err, "Prepare was not called")
	assert.ErrorContains(t, b.Cleanup(ctx, flannel.Env{}), "no netlink handle")
	assert.False(t, errors.Is(err, lease.ErrInvalidConfig))
}
