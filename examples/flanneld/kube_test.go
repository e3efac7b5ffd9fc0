package main

import (
	"fmt"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/flannelkit/flannel/internal/kubetest"
	"github.com/flannelkit/flannel/internal/netlab"
)

const (
	apiserverPort = 6443
	annotation    = "flannel.alpha.coreos.com/"
)

// TestDaemonKube runs flanneld --kube-subnet-mgr per node against a real
// kube-apiserver, relayed to the router's address, with the flannel
// ServiceAccount of deploy/kube-flannel.yaml. Not parallel: kubetest's
// etcd and apiserver pick free ports before binding them, which races with
// the other tests' embedded etcds.
func TestDaemonKube(t *testing.T) {
	srv := kubetest.NewT(t, kubetest.Options{})
	w := newLab(t, 2, false)
	u, err := url.Parse(srv.URL)
	require.NoError(t, err)
	w.relay(apiserverPort, u.Host)

	ctx := t.Context()
	manifests, err := os.ReadFile("../../deploy/kube-flannel.yaml")
	require.NoError(t, err)
	_, err = kubetest.Apply(ctx, srv.AdminConfig(), manifests, kubetest.ApplyOptions{})
	require.NoError(t, err)
	sa, err := srv.ServiceAccountConfig(ctx, "kube-flannel", "flannel")
	require.NoError(t, err)
	admin := kubetest.ClientT(t, srv.AdminConfig())

	podCIDR := func(i int) netip.Prefix { return netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", i+1)) }
	for i, n := range w.lab.Nodes {
		_, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: n.Name},
			Spec:       corev1.NodeSpec{PodCIDR: podCIDR(i).String(), PodCIDRs: []string{podCIDR(i).String()}},
		}, metav1.CreateOptions{})
		require.NoError(t, err)
	}

	// The certificate names 127.0.0.1 and localhost: the daemons dial the
	// router's address and verify the name localhost.
	kubeconfig := filepath.Join(w.dir, "kubeconfig")
	require.NoError(t, os.WriteFile(kubeconfig, fmt.Appendf(nil, `apiVersion: v1
kind: Config
clusters:
- name: lab
  cluster:
    server: https://%s
    certificate-authority: %s
    tls-server-name: localhost
users:
- name: flannel
  user:
    token: %s
contexts:
- name: lab
  context:
    cluster: lab
    user: flannel
current-context: lab
`, netip.AddrPortFrom(netlab.RouterIP(0), apiserverPort), srv.CAFile, sa.BearerToken), 0o600))
	netConf := filepath.Join(w.dir, "net-conf.json")
	require.NoError(t, os.WriteFile(netConf, variant{backend: "host-gw"}.netConf(), 0o644))
	w.storeArgs = func(int) []string {
		return []string{"--kube-subnet-mgr", "--kubeconfig-file=" + kubeconfig, "--net-config-path=" + netConf}
	}
	w.env = func(i int) []string { return []string{"NODE_NAME=" + w.lab.Nodes[i].Name} }

	for i := range w.lab.Nodes {
		w.start(i)
	}
	for i, n := range w.lab.Nodes {
		w.waitReady(i)
		assert.Equal(t, podCIDR(i), w.lease(i).Subnet, "node%d subnet is its podCIDR", i)
		node, err := admin.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		require.NoError(t, err)
		assert.Equal(t, "true", node.Annotations[annotation+"kube-subnet-manager"], "node%d", i)
		assert.Equal(t, n.IP.String(), node.Annotations[annotation+"public-ip"], "node%d", i)
		assert.Equal(t, "host-gw", node.Annotations[annotation+"backend-type"], "node%d", i)
	}
	for i := range w.lab.Nodes {
		own := podCIDR(i)
		other := podCIDR(1 - i)
		require.Eventually(t, func() bool { r := w.routes(i); return r[own] && r[other] }, 30*time.Second, 100*time.Millisecond, "node%d routes", i)
		w.addPod(i)
	}
	w.pingAll()

	// SIGTERM exits 0 and leaves the routes.
	for i := range w.lab.Nodes {
		require.NoError(t, w.stop(i, syscall.SIGTERM), "node%d graceful stop exits 0", i)
	}
	for i := range w.lab.Nodes {
		assert.True(t, w.routes(i)[podCIDR(1-i)], "node%d route kept after SIGTERM", i)
	}
	w.pingAll()
}
