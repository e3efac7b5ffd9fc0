package wireguard_test

import (
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/internal/vmlab"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/memstore"
	"github.com/flannelkit/flannel/wireguard"
)

// TestInVMAgents runs the wireguard backend under real Agents sharing an
// in-memory store, with K3s's wireguard-native configuration and a key
// file per node: the leases carry upstream's data, every pod pair talks,
// and no log holds a private key.
func TestInVMAgents(t *testing.T) {
	inVM(t)
	const nodes = 3
	lab := netlab.NewT(t, netlab.Options{Nodes: nodes})
	cfg, err := lease.ParseConfig([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","PersistentKeepaliveInterval":25}}`))
	require.NoError(t, err)
	store := memstore.New(cfg, memstore.Options{})
	logs := &testenv.LogBuffer{}
	dir := t.TempDir()
	agents, pods := vmlab.StartAgents(t, vmlab.Agents{
		Lab: lab, Store: store, Ready: 60 * time.Second,
		Logs: logs, Logger: slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Backend: func(n *netlab.Node) (flannel.Backend, error) {
			reg := backend.NewRegistry()
			if err := reg.Register(wireguard.Type, wireguard.Constructor(wireguard.Options{KeyFile: filepath.Join(dir, n.Name, "wgkey")})); err != nil {
				return nil, err
			}
			return reg.New(cfg)
		},
	})
	for _, a := range agents {
		assert.Equal(t, 1440, a.State().MTU)
	}
	vmlab.CheckPairs(t, pods, 30*time.Second)
	upstream := regexp.MustCompile(`^\{"PublicKey":"[A-Za-z0-9+/]{43}=","Port":51820\}$`)
	for _, l := range store.Leases() {
		assert.Equal(t, wireguard.Type, l.Attrs.BackendType)
		assert.Regexp(t, upstream, string(l.Attrs.BackendData), "lease %s", l)
		assert.Empty(t, l.Attrs.BackendV6Data)
	}
	for _, n := range lab.Nodes {
		d, err := wireguard.ReadDevice(n.NS, wireguard.DeviceName)
		require.NoError(t, err)
		require.Len(t, d.Peers, nodes-1)
		assert.Equal(t, 25*time.Second, d.Peers[0].PersistentKeepaliveInterval)
		key, err := os.ReadFile(filepath.Join(dir, n.Name, "wgkey"))
		require.NoError(t, err)
		assert.Equal(t, d.PrivateKey.String(), string(key))
		assert.NotContains(t, logs.String(), strings.TrimSpace(string(key)), "a private key in the log")
	}
}
