package deploy

import (
	"bytes"
	"context"
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/flannelkit/flannel/internal/kubetest"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/lease"
)

// EnvHelm overrides where the Helm CLI is found (default .cache/bin/helm,
// built by hack/test.sh from tools/helm).
const envHelm = "FLANNEL_HELM"

func helm(t *testing.T, args ...string) string {
	t.Helper()
	bin, ok := kubetest.Tool("helm", envHelm)
	testenv.Require(t, ok, "helm CLI at "+bin+" (hack/test.sh builds it; or set "+envHelm+")")
	cmd := exec.Command(bin, args...)
	cmd.Env = append(cmd.Environ(), "HELM_CACHE_HOME="+t.TempDir(), "HELM_CONFIG_HOME="+t.TempDir(), "HELM_DATA_HOME="+t.TempDir())
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	require.NoError(t, cmd.Run(), "helm %s: %s%s", strings.Join(args, " "), out.String(), errb.String())
	return out.String()
}

func TestChartLint(t *testing.T) {
	t.Parallel()
	out := helm(t, "lint", "--strict", "chart")
	assert.Contains(t, out, "0 chart(s) failed")
	helm(t, "lint", "--strict", "chart", "--set", "podCidrv6=fd00:10:244::/56", "--set", "backend.Type=host-gw")
}

// TestChart renders the chart with default and non-default values, checks
// what it renders and applies it to a real apiserver, then runs the store
// under the chart's ServiceAccount.
func TestChart(t *testing.T) {
	srv := kubetest.NewT(t, kubetest.Options{})
	admin := kubetest.ClientT(t, srv.AdminConfig())
	ctx := context.Background()
	for _, ns := range []string{"kube-flannel", "net"} {
		_, err := admin.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{})
		require.NoError(t, err)
	}

	tests := []struct {
		name, release, namespace string
		set                      []string
		check                    func(t *testing.T, cfg lease.Config, ds *unstructured.Unstructured)
	}{
		{"defaults", "flannel", "kube-flannel", nil, func(t *testing.T, cfg lease.Config, ds *unstructured.Unstructured) {
			assert.Equal(t, "10.244.0.0/16", cfg.Network.String())
			assert.False(t, cfg.EnableIPv6)
			assert.Equal(t, "vxlan", cfg.BackendType)
			args := containerArgs(t, ds)
			assert.Contains(t, args, "--ip-masq=true")
			assert.Contains(t, args, "--kube-subnet-mgr")
		}},
		{"dual-stack host-gw", "net", "net", []string{
			"podCidrv6=fd00:10:244::/56", "backend.Type=host-gw", "ipMasq=false",
			"iface={eth1,10.0.0.0}", "image.tag=v9", "resources.limits.memory=100Mi",
			"netConf.EnableNFTables=true",
		}, func(t *testing.T, cfg lease.Config, ds *unstructured.Unstructured) {
			assert.True(t, cfg.EnableIPv6)
			assert.Equal(t, "fd00:10:244::/56", cfg.IPv6Network.String())
			assert.Equal(t, "host-gw", cfg.BackendType)
			assert.True(t, cfg.EnableNFTables)
			args := containerArgs(t, ds)
			assert.Contains(t, args, "--ip-masq=false")
			assert.Contains(t, args, "--iface=eth1")
			assert.Contains(t, args, "--iface=10.0.0.0")
			c := container(t, ds)
			assert.Equal(t, "ghcr.io/flannelkit/flanneld:v9", c["image"])
			mem, _, _ := unstructured.NestedString(c, "resources", "limits", "memory")
			assert.Equal(t, "100Mi", mem)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := []string{"template", tt.release, "chart", "--namespace", tt.namespace}
			for _, s := range tt.set {
				args = append(args, "--set", s)
			}
			rendered := helm(t, args...)
			objs, err := kubetest.Apply(ctx, srv.AdminConfig(), []byte(rendered), kubetest.ApplyOptions{})
			require.NoError(t, err)
			kinds := map[string]*unstructured.Unstructured{}
			for _, o := range objs {
				kinds[o.GetKind()] = o
			}
			for _, k := range []string{"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet",
				"ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding"} {
				require.Contains(t, kinds, k)
			}
			netConf, _, _ := unstructured.NestedString(kinds["ConfigMap"].Object, "data", "net-conf.json")
			cfg, err := lease.ParseConfig([]byte(netConf))
			require.NoError(t, err, "rendered net-conf.json:\n%s", netConf)
			tt.check(t, cfg, kinds["DaemonSet"])
		})
	}

	// The default release's ServiceAccount runs the store (RBAC sufficient
	// and minimal); its ConfigMap holds the network config.
	cm, err := admin.CoreV1().ConfigMaps("kube-flannel").Get(ctx, "flannel-cfg", metav1.GetOptions{})
	require.NoError(t, err)
	u, err := toUnstructured(cm)
	require.NoError(t, err)
	checkStoreAsServiceAccount(t, srv, admin, u)
	_, err = admin.CoreV1().ServiceAccounts("kube-flannel").Get(ctx, "flannel", metav1.GetOptions{})
	assert.False(t, apierrors.IsNotFound(err))
}

func container(t *testing.T, ds *unstructured.Unstructured) map[string]any {
	t.Helper()
	cs, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "containers")
	require.Len(t, cs, 1)
	return cs[0].(map[string]any)
}

func containerArgs(t *testing.T, ds *unstructured.Unstructured) []string {
	t.Helper()
	args, _, _ := unstructured.NestedStringSlice(container(t, ds), "args")
	return args
}
