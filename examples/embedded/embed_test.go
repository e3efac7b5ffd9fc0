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
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/internal/kubetest"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/testenv"
)

// TestEmbedded runs runFlannel for two nodes in this process against a
// real kube-apiserver (Nodes with pod CIDRs, as the controller manager
// assigns them) and checks their pods reach each other over VXLAN, and that
// cancelling returns nil.
func TestEmbedded(t *testing.T) {
	testenv.RequireRoot(t)
	_, err := exec.LookPath("iptables")
	testenv.Require(t, err == nil, "iptables not installed")
	lab := netlab.NewT(t, netlab.Options{Nodes: 2})
	srv := kubetest.NewT(t, kubetest.Options{})
	client := kubetest.ClientT(t, srv.AdminConfig())
	for i := range lab.Nodes {
		_, err := client.CoreV1().Nodes().Create(t.Context(), &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: fmt.Sprintf("node%d", i)},
			Spec:       corev1.NodeSpec{PodCIDR: fmt.Sprintf("10.244.%d.0/24", i+5)},
		}, metav1.CreateOptions{})
		require.NoError(t, err)
	}

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
				Client: client, Name: fmt.Sprintf("node%d", i),
				NetConf: []byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`),
				NS:      n.NS, Iface: n.Iface,
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
			assert.Equal(t, fmt.Sprintf("10.244.%d.0/24", i+5), s.Lease.Subnet.String(), "the Node's podCIDR")
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
