package deploy

import (
	"context"
	"encoding/json"
	"net/netip"
	"os"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"

	"github.com/flannelkit/flannel/internal/kubetest"
	"github.com/flannelkit/flannel/kubestore"
	"github.com/flannelkit/flannel/lease"
)

// TestManifestsRBAC applies kube-flannel.yaml and runs the store under the
// ServiceAccount's own token: everything the store does is allowed, and
// what it does not need is forbidden.
func TestManifestsRBAC(t *testing.T) {
	srv := kubetest.NewT(t, kubetest.Options{})
	admin := kubetest.ClientT(t, srv.AdminConfig())
	ctx := context.Background()

	manifests, err := os.ReadFile("kube-flannel.yaml")
	require.NoError(t, err)
	objs, err := kubetest.Apply(ctx, srv.AdminConfig(), manifests, kubetest.ApplyOptions{})
	require.NoError(t, err)
	kinds := map[string]*unstructured.Unstructured{}
	for _, o := range objs {
		kinds[o.GetKind()] = o
	}
	for _, k := range []string{"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet",
		"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} {
		require.Contains(t, kinds, k)
	}
	checkStoreAsServiceAccount(t, srv, admin, kinds["ConfigMap"])
}

// checkStoreAsServiceAccount runs the store with the flannel
// ServiceAccount's token and checks what RBAC allows and forbids. cm is
// the applied ConfigMap holding net-conf.json.
func checkStoreAsServiceAccount(t *testing.T, srv *kubetest.Server, admin kubernetes.Interface, cm *unstructured.Unstructured) {
	t.Helper()
	ctx := context.Background()
	netConf, _, _ := unstructured.NestedString(cm.Object, "data", "net-conf.json")
	cfg, err := lease.ParseConfig([]byte(netConf))
	require.NoError(t, err, "net-conf.json of the ConfigMap")

	// Each node's daemon has a token bound to its pod on that node, as
	// the kubelet gives it.
	ns, saName := cm.GetNamespace(), "flannel"
	var sas []kubernetes.Interface
	for _, node := range []string{"node-1", "node-2"} {
		c, err := srv.PodServiceAccountConfig(ctx, ns, saName, node)
		require.NoError(t, err)
		sas = append(sas, kubetest.ClientT(t, c))
	}
	sa := sas[0]

	// The i-th subnet of the network (a /16 of /24s in the manifests).
	subnet := func(i int) string {
		a := cfg.Network.Addr().As4()
		return netip.PrefixFrom(netip.AddrFrom4([4]byte{a[0], a[1], byte(i), 0}), cfg.SubnetLen).String()
	}
	for i, name := range []string{"node-1", "node-2"} {
		_, err := admin.CoreV1().Nodes().Create(ctx, &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec:       corev1.NodeSpec{PodCIDR: subnet(i + 1), PodCIDRs: []string{subnet(i + 1)}},
		}, metav1.CreateOptions{})
		require.NoError(t, err)
	}

	// Allowed: everything the store does.
	var stores []*kubestore.Store
	var leases []lease.Lease
	for i, name := range []string{"node-1", "node-2"} {
		s, err := kubestore.New(sas[i].CoreV1().Nodes(), kubestore.Options{NodeName: name, Config: cfg, SetNodeNetworkUnavailable: true})
		require.NoError(t, err)
		l, err := s.Acquire(ctx, lease.Request{Attrs: lease.Attrs{
			PublicIP:    netip.AddrFrom4([4]byte{192, 168, 1, byte(i + 1)}),
			BackendType: cfg.BackendType,
			BackendData: json.RawMessage(`{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:0` + string(rune('1'+i)) + `"}`),
		}})
		require.NoError(t, err, "Acquire as the ServiceAccount")
		require.NoError(t, s.MarkReady(ctx), "MarkReady as the ServiceAccount")
		stores, leases = append(stores, s), append(leases, l)
	}
	wctx, cancel := context.WithCancel(ctx)
	got := make(chan lease.Snapshot, 16)
	done := make(chan error, 2)
	go func() {
		done <- stores[0].Watch(wctx, func(s lease.Snapshot) {
			select {
			case got <- s:
			default:
			}
		})
	}()
	go func() { done <- stores[0].Keep(wctx, leases[0]) }()
	select {
	case snap := <-got:
		assert.Len(t, snap.Leases, 2)
	case <-time.After(30 * time.Second):
		t.Fatal("no snapshot from Watch as the ServiceAccount")
	}
	cancel()
	require.NoError(t, <-done)
	require.NoError(t, <-done)

	// Forbidden: what the store never does.
	forbidden := []struct {
		name string
		do   func() error
	}{
		{"update node", func() error {
			n, err := admin.CoreV1().Nodes().Get(ctx, "node-1", metav1.GetOptions{})
			require.NoError(t, err)
			_, err = sa.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{})
			return err
		}},
		{"patch node (not status)", func() error {
			_, err := sa.CoreV1().Nodes().Patch(ctx, "node-1", "application/merge-patch+json", []byte(`{"metadata":{"labels":{"x":"y"}}}`), metav1.PatchOptions{})
			return err
		}},
		{"update node status", func() error {
			n, err := admin.CoreV1().Nodes().Get(ctx, "node-1", metav1.GetOptions{})
			require.NoError(t, err)
			_, err = sa.CoreV1().Nodes().UpdateStatus(ctx, n, metav1.UpdateOptions{})
			return err
		}},
		{"delete node", func() error { return sa.CoreV1().Nodes().Delete(ctx, "node-2", metav1.DeleteOptions{}) }},
		{"create node", func() error {
			_, err := sa.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: "x"}}, metav1.CreateOptions{})
			return err
		}},
		{"list pods", func() error {
			_, err := sa.CoreV1().Pods("").List(ctx, metav1.ListOptions{})
			return err
		}},
		{"read secrets", func() error {
			_, err := sa.CoreV1().Secrets("kube-system").List(ctx, metav1.ListOptions{})
			return err
		}},
	}
	for _, f := range forbidden {
		err := f.do()
		assert.True(t, apierrors.IsForbidden(err), "%s as the ServiceAccount: want forbidden, got %v", f.name, err)
	}
	checkOwnNodeOnly(t, srv, ns, saName, sas)
}

// checkOwnNodeOnly checks the admission policy: node-1's token may patch
// node-1's status and annotations but not node-2's, and a token bound to
// no pod may patch none.
func checkOwnNodeOnly(t *testing.T, srv *kubetest.Server, ns, saName string, sas []kubernetes.Interface) {
	t.Helper()
	ctx := context.Background()
	patch := func(c kubernetes.Interface, node, value string) error {
		body := `{"metadata":{"annotations":{"flannel.alpha.coreos.com/public-ip":"` + value + `"}}}`
		_, err := c.CoreV1().Nodes().Patch(ctx, node, "application/merge-patch+json", []byte(body), metav1.PatchOptions{}, "status")
		return err
	}
	// The policy is in force once the apiserver has loaded it.
	var err error
	require.Eventually(t, func() bool {
		err = patch(sas[0], "node-2", "192.0.2.66")
		return apierrors.IsForbidden(err)
	}, 30*time.Second, 100*time.Millisecond, "node-1's token patching node-2: want forbidden, got %v", err)
	assert.Contains(t, err.Error(), "only change the status of the Node its pod runs on, not node-2")
	require.NoError(t, patch(sas[1], "node-2", "192.168.1.2"), "node-2's token patching node-2")
	require.NoError(t, patch(sas[0], "node-1", "192.168.1.1"), "node-1's token patching node-1")

	unbound, err := srv.ServiceAccountConfig(ctx, ns, saName)
	require.NoError(t, err)
	err = patch(kubetest.ClientT(t, unbound), "node-1", "192.0.2.66")
	assert.True(t, apierrors.IsForbidden(err), "a token bound to no pod: want forbidden, got %v", err)
}

func toUnstructured(obj any) (*unstructured.Unstructured, error) {
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(obj)
	if err != nil {
		return nil, err
	}
	return &unstructured.Unstructured{Object: m}, nil
}
