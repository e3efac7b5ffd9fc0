package main

import (
	"context"
	"fmt"
	"net/netip"
	"os/exec"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/etcdstore"
	"github.com/flannelkit/flannel/internal/etcdtest"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/testenv"
)

// TestEmbedded runs runFlannel for two nodes in this process against a
// real etcd and checks their pods reach each other over VXLAN, and that
// cancelling returns nil.
func TestEmbedded(t *testing.T) {
	testenv.RequireRoot(t)
	_, err := exec.LookPath("iptables")
	testenv.Require(t, err == nil, "iptables not installed")
	lab := netlab.NewT(t, netlab.Options{Nodes: 2})
	srv := etcdtest.NewT(t, etcdtest.Options{})
	client := etcdtest.ClientT(t, srv)
	store, err := etcdstore.New(client, etcdstore.Options{})
	require.NoError(t, err)
	require.NoError(t, store.PutConfig(t.Context(), []byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`)))

	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	errs := make([]error, len(lab.Nodes))
	ready := make([]chan flannel.State, len(lab.Nodes))
	for i, n := range lab.Nodes {
		ready[i] = make(chan flannel.State, 1)
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = runFlannel(ctx, Node{
				Etcd: client, NS: n.NS, Iface: n.Iface,
				SubnetFile: fmt.Sprintf("%s/node%d.env", t.TempDir(), i),
				OnReady:    func(s flannel.State) { ready[i] <- s },
			})
		}()
	}
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			cancel()
			wg.Wait()
		}
	}
	t.Cleanup(stop)
	var pods []*netlab.Pod
	for i, n := range lab.Nodes {
		select {
		case s := <-ready[i]:
			p, err := n.AddPod("p", s.Lease.Subnet, netip.Prefix{}, netlab.WithMTU(s.MTU))
			require.NoError(t, err)
			pods = append(pods, p)
		case <-time.After(60 * time.Second):
			stop()
			t.Fatalf("node%d not ready: %v", i, errs[i])
		}
	}
	for _, pair := range [][2]int{{0, 1}, {1, 0}} {
		pctx, pcancel := context.WithTimeout(t.Context(), 20*time.Second)
		assert.NoError(t, pods[pair[0]].Ping(pctx, pods[pair[1]].IP))
		pcancel()
	}
	stop()
	for i, err := range errs {
		assert.NoError(t, err, "node%d", i)
	}
}
