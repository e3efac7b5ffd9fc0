package vmlab

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
)

// Agents is a set of real Agents, one per node of Lab, sharing Store.
type Agents struct {
	Lab     *netlab.Lab
	Store   flannel.LeaseStore
	Logs    *testenv.LogBuffer // what Logger writes to, shown when an agent is not ready
	Logger  *slog.Logger       // each agent's gets "node"=<name>
	Backend func(n *netlab.Node) (flannel.Backend, error)
	Ready   time.Duration // how long each agent may take to be ready
}

// StartAgents starts an Agent per node and waits until each is ready with
// every other node as a peer; then it adds a pod per node in the node's
// subnets with the agent's MTU. t's cleanup stops the agents, joins their
// goroutines and checks that none leaked.
func StartAgents(t *testing.T, o Agents) ([]*flannel.Agent, []*netlab.Pod) {
	t.Helper()
	ignore := goleak.IgnoreCurrent()
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait(); goleak.VerifyNone(t, ignore) })
	nodes := len(o.Lab.Nodes)
	agents := make([]*flannel.Agent, nodes)
	for i, n := range o.Lab.Nodes {
		be, err := o.Backend(n)
		require.NoError(t, err)
		iface, err := backend.FindInterface(n.Handle, backend.InterfaceOptions{IPv4: true})
		require.NoError(t, err)
		agents[i], err = flannel.NewAgent(flannel.AgentOptions{
			Store: o.Store, Backend: be, Iface: iface, Handle: n.Handle, NS: n.NS,
			Logger: o.Logger.With("node", n.Name),
		})
		require.NoError(t, err)
		a := agents[i]
		wg.Go(func() { assert.NoError(t, a.Run(ctx)) })
	}
	pods := make([]*netlab.Pod, nodes)
	for i, a := range agents {
		select {
		case <-a.Ready():
		case <-time.After(o.Ready):
			t.Fatalf("agent %d not ready:\n%s", i, o.Logs.String())
		}
		require.Eventually(t, func() bool { return a.State().Peers == nodes-1 }, 60*time.Second, 50*time.Millisecond)
		st := a.State()
		var err error
		pods[i], err = o.Lab.Nodes[i].AddPod("pod", st.Lease.Subnet, st.Lease.IPv6Subnet, netlab.WithMTU(st.MTU))
		require.NoError(t, err)
	}
	return agents, pods
}
