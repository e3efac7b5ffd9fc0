package deploy

import (
	"context"
	"encoding/json"
	"os"
	"testing"

	"github.com/containernetworking/cni/libcni"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/flannelkit/flannel/internal/kubetest"
)

// upstreamConflist is what upstream's manifest installs as
// /etc/cni/net.d/10-flannel.conflist.
const upstreamConflist = `{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}},{"type":"portmap","capabilities":{"portMappings":true}}]}`

// checkCNIInstall checks the CNI half of a DaemonSet and its ConfigMap:
// init containers named and mounted as upstream's, installing into the
// host paths binDir and confDir, and upstream's conflist.
func checkCNIInstall(t *testing.T, ds, cm *unstructured.Unstructured, binDir, confDir string) {
	t.Helper()
	conf, _, _ := unstructured.NestedString(cm.Object, "data", "cni-conf.json")
	_, err := libcni.ConfListFromBytes([]byte(conf))
	require.NoError(t, err, "cni-conf.json is a conflist")
	var got, want any
	require.NoError(t, json.Unmarshal([]byte(conf), &got))
	require.NoError(t, json.Unmarshal([]byte(upstreamConflist), &want))
	assert.Equal(t, want, got, "the conflist is upstream's")

	inits, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "initContainers")
	require.Len(t, inits, 2)
	byName := map[string]map[string]any{}
	for _, c := range inits {
		m := c.(map[string]any)
		byName[m["name"].(string)] = m
	}
	mounts := func(c map[string]any) map[string]string {
		out := map[string]string{}
		vs, _, _ := unstructured.NestedSlice(c, "volumeMounts")
		for _, v := range vs {
			m := v.(map[string]any)
			out[m["name"].(string)] = m["mountPath"].(string)
		}
		return out
	}
	plugin, cfg := byName["install-cni-plugin"], byName["install-cni"]
	require.NotNil(t, plugin)
	require.NotNil(t, cfg)
	assert.Equal(t, map[string]string{"cni-plugin": "/opt/cni/bin"}, mounts(plugin))
	assert.Equal(t, map[string]string{"cni": "/etc/cni/net.d", "flannel-cfg": "/etc/kube-flannel/"}, mounts(cfg))
	args, _, _ := unstructured.NestedStringSlice(cfg, "args")
	assert.Contains(t, args, "--cni-conf-file=/etc/cni/net.d/10-flannel.conflist")
	for _, c := range []map[string]any{plugin, cfg} {
		assert.Equal(t, container(t, ds)["image"], c["image"], "one image")
	}
	// Every container, the main one too, runs without privilege
	// escalation and under the runtime's default seccomp profile.
	for _, c := range []map[string]any{plugin, cfg, container(t, ds)} {
		esc, found, err := unstructured.NestedBool(c, "securityContext", "allowPrivilegeEscalation")
		require.NoError(t, err)
		assert.True(t, found && !esc, "container %s: allowPrivilegeEscalation: false", c["name"])
		prof, _, _ := unstructured.NestedString(c, "securityContext", "seccompProfile", "type")
		assert.Equal(t, "RuntimeDefault", prof, "container %s: seccompProfile", c["name"])
	}

	vols, _, _ := unstructured.NestedSlice(ds.Object, "spec", "template", "spec", "volumes")
	host := map[string]string{}
	for _, v := range vols {
		m := v.(map[string]any)
		if p, ok, _ := unstructured.NestedString(m, "hostPath", "path"); ok {
			host[m["name"].(string)] = p
		}
	}
	assert.Equal(t, binDir, host["cni-plugin"])
	assert.Equal(t, confDir, host["cni"])
}

func TestManifestInstallsCNI(t *testing.T) {
	srv := kubetest.NewT(t, kubetest.Options{})
	manifests, err := os.ReadFile("kube-flannel.yaml")
	require.NoError(t, err)
	objs, err := kubetest.Apply(context.Background(), srv.AdminConfig(), manifests, kubetest.ApplyOptions{})
	require.NoError(t, err)
	kinds := map[string]*unstructured.Unstructured{}
	for _, o := range objs {
		kinds[o.GetKind()] = o
	}
	checkCNIInstall(t, kinds["DaemonSet"], kinds["ConfigMap"], "/opt/cni/bin", "/etc/cni/net.d")
}

func TestChartCNIValues(t *testing.T) {
	t.Parallel()
	objs := func(set ...string) map[string]*unstructured.Unstructured {
		args := []string{"template", "flannel", "chart", "--namespace", "kube-flannel"}
		for _, s := range set {
			args = append(args, "--set", s)
		}
		docs, err := kubetest.Decode([]byte(helm(t, args...)))
		require.NoError(t, err)
		kinds := map[string]*unstructured.Unstructured{}
		for _, o := range docs {
			kinds[o.GetKind()] = o
		}
		return kinds
	}
	k := objs()
	checkCNIInstall(t, k["DaemonSet"], k["ConfigMap"], "/opt/cni/bin", "/etc/cni/net.d")
	k = objs("cniBinDir=/var/lib/rancher/cni/bin", "cniConfDir=/var/lib/rancher/cni/net.d")
	checkCNIInstall(t, k["DaemonSet"], k["ConfigMap"], "/var/lib/rancher/cni/bin", "/var/lib/rancher/cni/net.d")
	k = objs("skipCNIConfigInstallation=true")
	inits, found, _ := unstructured.NestedSlice(k["DaemonSet"].Object, "spec", "template", "spec", "initContainers")
	assert.False(t, found, "no init containers: %v", inits)
}
