package ipsec_test

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/vmlab"
	"github.com/flannelkit/flannel/internal/vmtest"
	"github.com/flannelkit/flannel/ipsec"
	"github.com/flannelkit/flannel/lease"
)

// TestHostKernelWithoutESP checks, on a kernel without ESP (like this
// project's CI host), that Prepare says so clearly and publishes nothing.
func TestHostKernelWithoutESP(t *testing.T) {
	if vmtest.Inside() {
		t.Skip("the VM kernel has ESP")
	}
	lab := netlab.NewT(t, netlab.Options{Nodes: 1})
	n := lab.Nodes[0]
	if ipsec.CheckKernel(n.Handle, ipsec.AESGCM128) == nil {
		t.Skip("not applicable: this kernel has ESP (the VM tests cover it)")
	}
	cfg, err := lease.ParseConfig([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"ipsec","PSK":"` + clusterPSK + `"}}`))
	require.NoError(t, err)
	reg := backend.NewRegistry()
	require.NoError(t, reg.Register(ipsec.Type, ipsec.FromConfig))
	b, err := reg.New(cfg)
	require.NoError(t, err)
	_, err = b.Prepare(t.Context(), vmlab.NodeEnv(n, cfg, nil))
	require.ErrorIs(t, err, ipsec.ErrNoESP)
	assert.Contains(t, err.Error(), "kernel lacks ESP")
	assert.NotContains(t, err.Error(), clusterPSK)
	_, err = b.Start(t.Context(), lease.Lease{Subnet: netip10()})
	assert.ErrorContains(t, err, "Prepare was not called")
}

func netip10() netip.Prefix { return netip.MustParsePrefix("10.244.1.0/24") }
