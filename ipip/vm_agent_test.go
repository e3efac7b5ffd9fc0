package ipip_test

import (
	"context"
	"log/slog"
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
	"github.com/flannelkit/flannel/ipip"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/memstore"
)

// TestInVMAgents runs real Agents with the ipip backend from net-conf.json
// (DirectRouting on) on 3 nodes on two segments: each is ready with its
// peers, and every pod reaches every other.
func TestInVMAgents(t *testing.T) {
	inVM(t)
	ignore := goleak.IgnoreCurrent()
	lab := netlab.NewT(t, netlab.Options{Nodes: 3, Segments: 2})
	cfg, err := lease.ParseConfig([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"ipip","DirectRouting":true}}`))
	require.NoError(t, err)
	store := memstore.New(cfg, memstore.Options{})
	var logs testenv.LogBuffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	defer func() { cancel(); wg.Wait(); goleak.VerifyNone(t, ignore) }()
	agents := make([]*flannel.Agent, len(lab.Nodes))
	for i, n := range lab.Nodes {
		r := backend.NewRegistry()
		require.NoError(t, r.Register(ipip.Type, ipip.FromConfig))
		be, err := r.New(cfg)
		require.NoError(t, err)
		iface, err := backend.FindInterface(n.Handle, backend.InterfaceOptions{IPv4: true})
		require.NoError(t, err)
		agents[i], err = flannel.NewAgent(flannel.AgentOptions{
			Store: store, Backend: be, Iface: iface, Handle: n.Handle, NS: n.NS, Logger: log.With("node", n.Name),
		})
		require.NoError(t, err)
		a := agents[i]
		wg.Go(func() { assert.NoError(t, a.Run(ctx)) })
	}
	pods := make([]*netlab.Pod, len(agents))
	for i, a := range agents {
		select {
		case <-a.Ready():
		case <-time.After(90 * time.Second):
			t.Fatalf("agent %d not ready:\n%s", i, logs.String())
		}
		require.Eventually(t, func() bool { return a.State().Peers == 2 }, 60*time.Second, 50*time.Millisecond)
		st := a.State()
		assert.Equal(t, 1480, st.MTU)
		assert.Equal(t, "ipip", st.Lease.Attrs.BackendType)
		pods[i], err = lab.Nodes[i].AddPod("pod", st.Lease.Subnet, st.Lease.IPv6Subnet, netlab.WithMTU(st.MTU))
		require.NoError(t, err)
	}
	vmlab.CheckPairs(t, pods, 30*time.Second)
}
