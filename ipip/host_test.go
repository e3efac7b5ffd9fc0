package ipip_test

import (
	"context"
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/internal/vmtest"
	"github.com/flannelkit/flannel/ipip"
	"github.com/flannelkit/flannel/lease"
)

func TestParseOptions(t *testing.T) {
	tests := []struct {
		name, raw, wantErr string
		want               ipip.Options
	}{
		{name: "empty"},
		{name: "type only", raw: `{"Type":"ipip"}`},
		{name: "direct routing", raw: `{"Type":"ipip","DirectRouting":true}`, want: ipip.Options{DirectRouting: true}},
		{name: "lower case", raw: `{"type":"ipip","directrouting":true}`, want: ipip.Options{DirectRouting: true}},
		{name: "unknown key named", raw: `{"Type":"ipip","VNI":1}`, wantErr: "Backend.VNI: unknown key"},
		{name: "wrong type", raw: `{"DirectRouting":"yes"}`, wantErr: "Backend.DirectRouting: not a boolean"},
		{name: "not an object", raw: `1`, wantErr: "Backend:"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := ipip.ParseOptions(json.RawMessage(tc.raw))
			if tc.wantErr != "" {
				assert.ErrorContains(t, err, tc.wantErr)
				assert.ErrorIs(t, err, lease.ErrInvalidConfig)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestFromConfigIPv4Only(t *testing.T) {
	r := backend.NewRegistry()
	require.NoError(t, r.Register(ipip.Type, ipip.FromConfig))
	for _, conf := range []string{
		`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"ipip"}}`,
		`{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"ipip"}}`,
	} {
		cfg, err := lease.ParseConfig([]byte(conf))
		require.NoError(t, err, conf)
		_, err = r.New(cfg)
		assert.ErrorIs(t, err, lease.ErrInvalidConfig, conf)
		assert.ErrorContains(t, err, "EnableIPv6: the ipip backend is IPv4 only", conf)
	}
	cfg, err := lease.ParseConfig([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"ipip","DirectRouting":true}}`))
	require.NoError(t, err)
	b, err := r.New(cfg)
	require.NoError(t, err)
	assert.Equal(t, "ipip", b.Type())
	_, err = ipip.FromConfig(lease.Config{BackendType: "vxlan"})
	assert.ErrorIs(t, err, lease.ErrInvalidConfig)
}

func TestPreconditions(t *testing.T) {
	b := ipip.New(ipip.Options{})
	_, err := b.Prepare(context.Background(), flannel.Env{})
	assert.ErrorContains(t, err, "no netlink handle")
	_, err = b.Start(context.Background(), lease.Lease{})
	assert.ErrorContains(t, err, "Prepare was not called")
	assert.ErrorContains(t, b.Cleanup(context.Background(), flannel.Env{}), "no netlink handle")
}

// TestNoKernelModule runs on a kernel without ipip (this host's): Prepare
// fails with an error that names the module. Inside the VM, which has it,
// the same Prepare succeeds (TestInVM*).
func TestNoKernelModule(t *testing.T) {
	if vmtest.Inside() {
		t.Skip("the VM kernel has ipip")
	}
	testenv.RequireRoot(t)
	lab := netlab.NewT(t, netlab.Options{Nodes: 1})
	n := lab.Nodes[0]
	if _, err := n.Handle.LinkByName("tunl0"); err == nil {
		t.Skip("this kernel has ipip loaded (tunl0 exists); the VM tests cover it")
	}
	b := ipip.New(ipip.Options{})
	_, err := b.Prepare(context.Background(), flannel.Env{
		Iface:  flannel.ExternalInterface{Name: n.Iface, IP: n.IP, PublicIP: n.IP},
		Handle: n.Handle, NS: n.NS,
	})
	require.Error(t, err)
	assert.ErrorIs(t, err, ipip.ErrNoKernelSupport)
	assert.ErrorContains(t, err, "modprobe ipip")
	t.Log(err)
}
