package wireguard_test

import (
	"net/netip"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/internal/vmlab"
	"github.com/flannelkit/flannel/internal/vmtest"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/wireguard"
)

// TestHostKernelWithoutWireGuard checks, on a kernel without WireGuard
// (like this project's CI host), that Prepare says so, naming the module,
// and leaves no device behind.
func TestHostKernelWithoutWireGuard(t *testing.T) {
	if vmtest.Inside() {
		t.Skip("the VM kernel has WireGuard")
	}
	lab := netlab.NewT(t, netlab.Options{Nodes: 1})
	n := lab.Nodes[0]
	if wireguard.CheckKernel(n.Handle) == nil {
		t.Skip("not applicable: this kernel has WireGuard (the VM tests cover it)")
	}
	err := wireguard.CheckKernel(n.Handle)
	require.ErrorIs(t, err, wireguard.ErrNoWireGuard)
	assert.Contains(t, err.Error(), "module wireguard")

	cfg, err := lease.ParseConfig([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard"}}`))
	require.NoError(t, err)
	reg := backend.NewRegistry()
	require.NoError(t, reg.Register(wireguard.Type, wireguard.Constructor(wireguard.Options{KeyFile: filepath.Join(t.TempDir(), "wgkey")})))
	b, err := reg.New(cfg)
	require.NoError(t, err)
	_, err = b.Prepare(t.Context(), vmlab.NodeEnv(n, cfg, nil))
	require.ErrorIs(t, err, wireguard.ErrNoWireGuard)
	assert.Contains(t, err.Error(), "kernel lacks WireGuard (module wireguard needed")
	links, err := nlsafe.Wrap(n.Handle).LinkList()
	require.NoError(t, err)
	for _, l := range links {
		assert.NotContains(t, l.Attrs().Name, "flannel-wg")
	}
	_, err = b.Start(t.Context(), lease.Lease{Subnet: netip.MustParsePrefix("10.244.1.0/24")})
	assert.ErrorContains(t, err, "Prepare was not called")
	require.NoError(t, b.Cleanup(t.Context(), flannel.Env{Handle: n.Handle}), "cleanup with nothing there")
}
