package kubestore_test

import (
	"context"
	"fmt"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/hostgw"
	"github.com/flannelkit/flannel/internal/kubetest"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/kubestore"
)

// TestAgentsHostGW runs two agents with the host-gw dataplane on lab nodes
// (network namespaces), each with its own kube store on the real apiserver,
// and checks that their pods reach each other (dual-stack), and that the
// Nodes carry the annotations and the NetworkUnavailable=False condition.
func TestAgentsHostGW(t *testing.T) {
	testenv.RequireRoot(t)
	srv := kubetest.NewT(t, kubetest.Options{})
	cs := kubetest.ClientT(t, srv.AdminConfig())
	lab := netlab.NewT(t, netlab.Options{Nodes: 2, IPv4: true, IPv6: true})
	logs := &testenv.LogBuffer{}
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(logs.String())
		}
	})

	var pods []*netlab.Pod
	var wg sync.WaitGroup
	ctx, cancel := context.WithCancel(context.Background())
	defer func() {
		cancel()
		wg.Wait()
	}()
	agents := make([]*flannel.Agent, len(lab.Nodes))
	for i, ln := range lab.Nodes {
		name := fmt.Sprintf("kube-%d", i)
		createNode(t, cs, name, nil, fmt.Sprintf("10.244.%d.0/24", i+1), fmt.Sprintf("fd00:10:244:%d::/64", i+1))
		s := newStore(t, cs, name, `{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00:10:244::/56","Backend":{"Type":"host-gw"}}`,
			kubestore.Options{SetNodeNetworkUnavailable: true, Logger: logs.Logger().With("node", name)})
		iface, err := backend.FindInterface(ln.Handle, backend.InterfaceOptions{IPv4: true, IPv6: true})
		require.NoError(t, err)
		hg, err := hostgw.New(hostgw.Options{})
		require.NoError(t, err)
		a, err := flannel.NewAgent(flannel.AgentOptions{
			Store:    s,
			Backend:  hg,
			Iface:    iface,
			Handle:   ln.Handle,
			NS:       ln.NS,
			Logger:   logs.Logger().With("node", name),
			RetryMin: 50 * time.Millisecond,
			RetryMax: time.Second,
		})
		require.NoError(t, err)
		agents[i] = a
		wg.Go(func() { assert.NoError(t, a.Run(ctx), "agent %s", name) })
	}
	for i, a := range agents {
		select {
		case <-a.Ready():
		case <-time.After(60 * time.Second):
			t.Fatalf("agent %d not ready", i)
		}
		require.Eventually(t, func() bool { return a.State().Peers == 1 }, 60*time.Second, 20*time.Millisecond)
		l := a.State().Lease
		p, err := lab.Nodes[i].AddPod("p0", l.Subnet, l.IPv6Subnet)
		require.NoError(t, err)
		pods = append(pods, p)
	}

	pctx, pcancel := context.WithTimeout(ctx, 60*time.Second)
	defer pcancel()
	for _, pair := range [][2]int{{0, 1}, {1, 0}} {
		from, to := pods[pair[0]], pods[pair[1]]
		for _, dst := range []netip.Addr{to.IP, to.IPv6} {
			assert.NoError(t, from.Ping(pctx, dst), "icmp %s -> %s", from.Name, dst)
			assert.NoError(t, from.TCPCheck(pctx, to, dst), "tcp %s -> %s", from.Name, dst)
		}
	}

	for i := range lab.Nodes {
		n := getNode(t, cs, fmt.Sprintf("kube-%d", i))
		assert.Equal(t, "host-gw", n.Annotations[pfx+"backend-type"])
		assert.Equal(t, lab.Nodes[i].IP.String(), n.Annotations[pfx+"public-ip"])
		require.Eventually(t, func() bool {
			for _, c := range getNode(t, cs, n.Name).Status.Conditions {
				if c.Type == "NetworkUnavailable" && c.Status == "False" && c.Reason == "FlannelIsUp" {
					return true
				}
			}
			return false
		}, 30*time.Second, 20*time.Millisecond, "node %s condition", n.Name)
	}
}
