package wireguard_test

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

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
	ignore := goleak.IgnoreCurrent()
	const nodes = 3
	lab := netlab.NewT(t, netlab.Options{Nodes: nodes})
	cfg, err := lease.ParseConfig([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"wireguard","PersistentKeepaliveInterval":25}}`))
	require.NoError(t, err)
	store := memstore.New(cfg, memstore.Options{})
	logs := &testenv.LogBuffer{}
	log := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	dir := t.TempDir()

	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait(); goleak.VerifyNone(t, ignore) })
	agents := make([]*flannel.Agent, nodes)
	for i, n := range lab.Nodes {
		reg := backend.NewRegistry()
		require.NoError(t, reg.Register(wireguard.Type, wireguard.Constructor(wireguard.Options{KeyFile: filepath.Join(dir, n.Name, "wgkey")})))
		be, err := reg.New(cfg)
		require.NoError(t, err)
		iface, err := backend.FindInterface(n.Handle, backend.InterfaceOptions{IPv4: true})
		require.NoError(t, err)
		agents[i], err = flannel.NewAgent(flannel.AgentOptions{
			Store: store, Backend: be, Iface: iface, Handle: n.Handle, NS: n.NS,
			Logger: log.With("node", n.Name),
		})
		require.NoError(t, err)
		a := agents[i]
		wg.Go(func() { assert.NoError(t, a.Run(ctx)) })
	}
	pods := make([]*netlab.Pod, nodes)
	for i, a := range agents {
		select {
		case <-a.Ready():
		case <-time.After(60 * time.Second):
			t.Fatalf("agent %d not ready", i)
		}
		require.Eventually(t, func() bool { return a.State().Peers == nodes-1 }, 60*time.Second, 50*time.Millisecond)
		st := a.State()
		assert.Equal(t, 1440, st.MTU)
		pods[i], err = lab.Nodes[i].AddPod("pod", st.Lease.Subnet, st.Lease.IPv6Subnet, netlab.WithMTU(st.MTU))
		require.NoError(t, err)
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
