package extension_test

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/extension"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/memstore"
)

// TestAgentsReachEachOther runs real Agents with the extension backend on
// three netlab nodes, the net-conf.json carrying upstream's host-gw
// example: the commands alone make every pod reach every other. A node
// that leaves gets its routes removed on the others.
func TestAgentsReachEachOther(t *testing.T) {
	testenv.RequireRoot(t)
	ignore := goleak.IgnoreCurrent()
	lab := netlab.NewT(t, netlab.Options{Nodes: 3})
	add, del := hostgwCommands()
	cfg, err := lease.ParseConfig(fmt.Appendf(nil, `{"Network":"10.244.0.0/16","Backend":{"Type":"extension","SubnetAddCommand":%q,"SubnetRemoveCommand":%q}}`, add, del))
	require.NoError(t, err)
	store := memstore.New(cfg, memstore.Options{})
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	type agent struct {
		a      *flannel.Agent
		done   chan error
		cancel context.CancelFunc
		node   *netlab.Node
		pod    *netlab.Pod
	}
	var agents []*agent
	for _, n := range lab.Nodes {
		iface, err := backend.FindInterface(n.Handle, backend.InterfaceOptions{IPv4: true})
		require.NoError(t, err)
		b, err := extension.Constructor(extension.Options{StateDir: filepath.Join(dir, n.Name)})(cfg)
		require.NoError(t, err)
		var logs testenv.LogBuffer
		a, err := flannel.NewAgent(flannel.AgentOptions{Store: store, Backend: b, Iface: iface, Handle: n.Handle, NS: n.NS, Logger: logs.Logger()})
		require.NoError(t, err)
		actx, acancel := context.WithCancel(ctx)
		ag := &agent{a: a, done: make(chan error, 1), node: n, cancel: acancel}
		go func() { ag.done <- a.Run(actx) }()
		agents = append(agents, ag)
	}
	for _, ag := range agents {
		select {
		case <-ag.a.Ready():
		case err := <-ag.done:
			t.Fatalf("%s stopped: %v", ag.node.Name, err)
		case <-time.After(time.Minute):
			t.Fatalf("%s not ready", ag.node.Name)
		}
		own := ag.a.State().Lease
		assert.Equal(t, "extension", own.Attrs.BackendType)
		ag.pod, err = ag.node.AddPod("pod", own.Subnet, own.IPv6Subnet)
		require.NoError(t, err)
	}
	for _, ag := range agents {
		require.Eventually(t, func() bool { return len(routes(t, ag.node.Handle)) == 2 }, 30*time.Second, 20*time.Millisecond, "%s: routes to both peers", ag.node.Name)
	}
	for _, a := range agents {
		for _, b := range agents {
			if a == b {
				continue
			}
			pctx, pcancel := context.WithTimeout(context.Background(), 20*time.Second)
			assert.NoError(t, a.pod.Ping(pctx, b.pod.IP), "ping %s -> %s", a.node.Name, b.node.Name)
			assert.NoError(t, a.pod.TCPCheck(pctx, b.pod, b.pod.IP), "tcp %s -> %s", a.node.Name, b.node.Name)
			pcancel()
		}
	}
	// node2 stops and vanishes: its lease goes, and so do the routes to it.
	gone := agents[2].a.State().Lease
	agents[2].cancel()
	require.NoError(t, <-agents[2].done)
	require.True(t, store.Remove(gone.Subnet))
	for _, ag := range agents[:2] {
		require.Eventually(t, func() bool { return len(routes(t, ag.node.Handle)) == 1 }, 30*time.Second, 20*time.Millisecond, "%s: route to the gone node removed", ag.node.Name)
		assert.NotContains(t, routes(t, ag.node.Handle), fmt.Sprintf("%s via %s", gone.Subnet, gone.Attrs.PublicIP))
	}
	cancel()
	for _, ag := range agents[:2] {
		require.NoError(t, <-ag.done)
	}
	goleak.VerifyNone(t, ignore)
}
