package main

import (
	"fmt"
	"net"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
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
// ServiceAccount of deploy/kube-flannel.yaml: host-gw over IPv4 (SIGTERM
// keeps the datapath) and vxlan dual-stack (kill -9 and restart lose no
// ping and keep the VTEP MAC; --cleanup removes the datapath). The
// variants run one after the other, not in parallel: kubetest's etcd and
// apiserver pick free ports before binding them, which races with the
// other tests' embedded etcds.
func TestDaemonKube(t *testing.T) {
	for _, v := range []variant{
		{name: "host-gw", backend: "host-gw"},
		{name: "vxlan-dualstack", backend: "vxlan", dual: true},
	} {
		t.Run(v.name, func(t *testing.T) { testDaemonKube(t, v) })
	}
}

func testDaemonKube(t *testing.T, v variant) {
	srv := kubetest.NewT(t, kubetest.Options{})
	w := newLab(t, 2, v.dual)
	u, err := url.Parse(srv.URL)
	require.NoError(t, err)
	w.relay(apiserverPort, u.Host)

	ctx := t.Context()
	manifests, err := os.ReadFile("../../deploy/kube-flannel.yaml")
	require.NoError(t, err)
	_, err = kubetest.Apply(ctx, srv.AdminConfig(), manifests, kubetest.ApplyOptions{})
	require.NoError(t, err)
	admin := kubetest.ClientT(t, srv.AdminConfig())

	podCIDR := func(i int) netip.Prefix { return netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", i+1)) }
	podCIDR6 := func(i int) netip.Prefix { return netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%d::/64", i+1)) }
	// In the host-gw run node1's operator chose its public address with
	// upstream's node-public-ip annotation: a second address on its eth0,
	// which the daemon must publish (and its peer route through) instead
	// of the interface's first.
	publicIP := func(i int) netip.Addr { return w.lab.Nodes[i].IP }
	if v.backend == "host-gw" {
		n1 := w.lab.Nodes[1]
		a := n1.IP.As4()
		a[3] += 100
		second := netip.AddrFrom4(a)
		eth0, err := n1.Handle.LinkByName("eth0")
		require.NoError(t, err)
		require.NoError(t, n1.Handle.AddrAdd(eth0, &netlink.Addr{IPNet: &net.IPNet{IP: second.AsSlice(), Mask: net.CIDRMask(24, 32)}}))
		publicIP = func(i int) netip.Addr {
			if i == 1 {
				return second
			}
			return w.lab.Nodes[i].IP
		}
	}
	for i, n := range w.lab.Nodes {
		cidrs := []string{podCIDR(i).String()}
		if v.dual {
			cidrs = append(cidrs, podCIDR6(i).String())
		}
		meta := metav1.ObjectMeta{Name: n.Name}
		if publicIP(i) != n.IP {
			meta.Annotations = map[string]string{annotation + "node-public-ip": publicIP(i).String()}
		}
		_, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{
			ObjectMeta: meta,
			Spec:       corev1.NodeSpec{PodCIDR: cidrs[0], PodCIDRs: cidrs},
		}, metav1.CreateOptions{})
		require.NoError(t, err)
	}
	// The certificate names 127.0.0.1 and localhost: the daemons dial the
	// router's address and verify the name localhost. Each daemon has the
	// token of a pod on its node, as the kubelet gives it: the manifest's
	// admission policy lets it patch only that Node.
	kubeconfigs := make([]string, len(w.lab.Nodes))
	for i, n := range w.lab.Nodes {
		sa, err := srv.PodServiceAccountConfig(ctx, "kube-flannel", "flannel", n.Name)
		require.NoError(t, err)
		kubeconfigs[i] = filepath.Join(w.dir, "kubeconfig-"+n.Name)
		require.NoError(t, os.WriteFile(kubeconfigs[i], fmt.Appendf(nil, `apiVersion: v1
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
	}
	netConf := filepath.Join(w.dir, "net-conf.json")
	require.NoError(t, os.WriteFile(netConf, v.netConf(), 0o644))
	w.storeArgs = func(i int) []string {
		return []string{"--kube-subnet-mgr", "--kubeconfig-file=" + kubeconfigs[i], "--net-config-path=" + netConf}
	}
	w.env = func(i int) []string { return []string{"NODE_NAME=" + w.lab.Nodes[i].Name} }
	node := func(i int) *corev1.Node {
		n, err := admin.CoreV1().Nodes().Get(ctx, w.lab.Nodes[i].Name, metav1.GetOptions{})
		require.NoError(t, err)
		return n
	}

	for i := range w.lab.Nodes {
		w.start(i)
	}
	for i, n := range w.lab.Nodes {
		w.waitReady(i)
		assert.Equal(t, podCIDR(i), w.lease(i).Subnet, "node%d subnet is its podCIDR", i)
		a := node(i).Annotations
		assert.Equal(t, "true", a[annotation+"kube-subnet-manager"], "node%d", i)
		assert.Equal(t, publicIP(i).String(), a[annotation+"public-ip"], "node%d", i)
		assert.Equal(t, v.backend, a[annotation+"backend-type"], "node%d", i)
		if v.dual {
			assert.Equal(t, podCIDR6(i), w.lease(i).IPv6Subnet, "node%d IPv6 subnet is its second podCIDR", i)
			assert.Equal(t, n.IPv6.String(), a[annotation+"public-ipv6"], "node%d", i)
		}
		if v.backend == "vxlan" {
			assert.Contains(t, a[annotation+"backend-data"], `"VtepMAC"`, "node%d", i)
			if v.dual {
				assert.Contains(t, a[annotation+"backend-v6-data"], `"VtepMAC"`, "node%d", i)
			}
		}
	}
	for i := range w.lab.Nodes {
		want := []netip.Prefix{podCIDR(i), podCIDR(1 - i)}
		if v.dual {
			want = append(want, podCIDR6(i), podCIDR6(1-i))
		}
		require.Eventually(t, func() bool {
			r := w.routes(i)
			for _, p := range want {
				if !r[p] {
					return false
				}
			}
			return true
		}, 30*time.Second, 100*time.Millisecond, "node%d routes", i)
		w.addPod(i)
	}
	w.pingAll()

	if v.backend == "host-gw" {
		// SIGTERM exits 0 and leaves the routes.
		for i := range w.lab.Nodes {
			require.NoError(t, w.stop(i, syscall.SIGTERM), "node%d graceful stop exits 0", i)
		}
		for i := range w.lab.Nodes {
			assert.True(t, w.routes(i)[podCIDR(1-i)], "node%d route kept after SIGTERM", i)
		}
		w.pingAll()
		return
	}

	// kill -9 and a restart: no ping lost, same subnet, same VTEP MAC in
	// the annotations (peers' FDB entries stay valid).
	data := node(1).Annotations[annotation+"backend-data"]
	w.killRestart(1, 0)
	assert.Equal(t, data, node(1).Annotations[annotation+"backend-data"], "VTEP MAC kept across the restart")
	w.pingAll()

	// --cleanup removes node1's devices, routes and subnet file (its Node
	// annotations stay, as upstream leaves them).
	require.NoError(t, w.stop(1, syscall.SIGTERM))
	cmd := exec.Command("ip", w.args(1, "--cleanup")...)
	cmd.Env = append(os.Environ(), w.env(1)...)
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Empty(t, w.routes(1))
	assert.Empty(t, w.flannelLinks(1))
	_, err = os.Stat(w.subnetFile(1))
	assert.ErrorIs(t, err, os.ErrNotExist)
	assert.NotContains(t, string(out), "level=ERROR")
}
