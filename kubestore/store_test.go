package kubestore_test

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
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/flannelkit/flannel/internal/kubetest"
	"github.com/flannelkit/flannel/internal/storetest"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/kubestore"
	"github.com/flannelkit/flannel/lease"
)

const pfx = kubestore.DefaultAnnotationPrefix + "/"

var vxlanAttrs = lease.Attrs{
	PublicIP:    netip.MustParseAddr("192.168.1.11"),
	BackendType: "vxlan",
	BackendData: json.RawMessage(`{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:09"}`),
}

func TestNewOptions(t *testing.T) {
	cs := fake.NewClientset()
	good := config(t, netConf4)
	tests := []struct {
		name    string
		opts    kubestore.Options
		wantErr string
	}{
		{"ok", kubestore.Options{NodeName: "n", Config: good}, ""},
		{"no node", kubestore.Options{Config: good}, "NodeName is required"},
		{"no config", kubestore.Options{NodeName: "n"}, "invalid network config"},
		{"prefix with slash", kubestore.Options{NodeName: "n", Config: good, AnnotationPrefix: "example.com/net"}, ""},
		{"prefix two slashes", kubestore.Options{NodeName: "n", Config: good, AnnotationPrefix: "a/b/c"}, "at most one"},
		{"prefix invalid chars", kubestore.Options{NodeName: "n", Config: good, AnnotationPrefix: "Not_Valid!"}, "invalid annotation key"},
		{"prefix too long name", kubestore.Options{NodeName: "n", Config: good, AnnotationPrefix: "example.com/" + string(make([]byte, 70))}, "invalid annotation key"},
		{"retry bounds", kubestore.Options{NodeName: "n", Config: good, RetryMin: time.Second, RetryMax: time.Millisecond}, "RetryMax"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := kubestore.New(cs.CoreV1().Nodes(), tt.opts)
			if tt.wantErr == "" {
				assert.NoError(t, err)
				return
			}
			assert.ErrorContains(t, err, tt.wantErr)
		})
	}
	_, err := kubestore.New(nil, kubestore.Options{NodeName: "n", Config: good})
	assert.ErrorContains(t, err, "client is required")
}

// TestStore runs the store against one real kube-apiserver; the subtests
// run in parallel on distinct nodes and subnets.
func TestStore(t *testing.T) {
	srv := kubetest.NewT(t, kubetest.Options{})
	cs := kubetest.ClientT(t, srv.AdminConfig())
	ctx := context.Background()

	t.Run("acquire writes upstream annotations", func(t *testing.T) {
		t.Parallel()
		createNode(t, cs, "acq-compat", nil, "10.244.3.0/24")
		s := newStore(t, cs, "acq-compat", netConf4, kubestore.Options{})
		l, err := s.Acquire(ctx, lease.Request{Attrs: vxlanAttrs})
		require.NoError(t, err)
		assert.Equal(t, "10.244.3.0/24", l.Subnet.String())
		assert.False(t, l.IPv6Subnet.IsValid())
		assert.True(t, l.Attrs.Equal(vxlanAttrs))
		assert.True(t, l.Expiration.IsZero())

		// Exactly the flannel annotations of upstream's node.json.
		var sample corev1.Node
		b, err := readFile("testdata/node.json")
		require.NoError(t, err)
		require.NoError(t, json.Unmarshal(b, &sample))
		n := getNode(t, cs, "acq-compat")
		assert.Equal(t, flannelAnnotations(&sample), flannelAnnotations(n))

		// Nothing changed: no write.
		rv := n.ResourceVersion
		_, err = s.Acquire(ctx, lease.Request{Attrs: vxlanAttrs})
		require.NoError(t, err)
		assert.Equal(t, rv, getNode(t, cs, "acq-compat").ResourceVersion, "an unchanged Acquire must not write")

		// A changed attribute is patched, other annotations are kept.
		_, err = cs.CoreV1().Nodes().Patch(ctx, "acq-compat", "application/merge-patch+json",
			[]byte(`{"metadata":{"annotations":{"other":"x"}}}`), metav1.PatchOptions{})
		require.NoError(t, err)
		attrs := vxlanAttrs
		attrs.PublicIP = netip.MustParseAddr("192.168.1.12")
		_, err = s.Acquire(ctx, lease.Request{Attrs: attrs})
		require.NoError(t, err)
		n = getNode(t, cs, "acq-compat")
		assert.Equal(t, "192.168.1.12", n.Annotations[pfx+"public-ip"])
		assert.Equal(t, "x", n.Annotations["other"])
	})

	t.Run("dual-stack acquire", func(t *testing.T) {
		t.Parallel()
		createNode(t, cs, "acq-dual", map[string]string{}, "10.244.4.0/24", "fd00:10:244:4::/64")
		s := newStore(t, cs, "acq-dual", netConfDual, kubestore.Options{})
		attrs := vxlanAttrs
		attrs.PublicIPv6 = netip.MustParseAddr("fd00::11")
		attrs.BackendV6Data = json.RawMessage(`{"VNI":1, "VtepMAC":"7a:1e:6c:d2:4a:0a"}`)
		l, err := s.Acquire(ctx, lease.Request{Attrs: attrs})
		require.NoError(t, err)
		assert.Equal(t, "10.244.4.0/24", l.Subnet.String())
		assert.Equal(t, "fd00:10:244:4::/64", l.IPv6Subnet.String())
		n := getNode(t, cs, "acq-dual")
		assert.Equal(t, map[string]string{
			pfx + "kube-subnet-manager": "true",
			pfx + "backend-type":        "vxlan",
			pfx + "backend-data":        `{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:09"}`,
			pfx + "backend-v6-data":     `{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:0a"}`,
			pfx + "public-ip":           "192.168.1.11",
			pfx + "public-ipv6":         "fd00::11",
		}, flannelAnnotations(n))
	})

	t.Run("public-ip-overwrite wins", func(t *testing.T) {
		t.Parallel()
		createNode(t, cs, "acq-overwrite", map[string]string{
			pfx + "public-ip-overwrite": "203.0.113.7",
		}, "10.244.5.0/24")
		s := newStore(t, cs, "acq-overwrite", netConf4, kubestore.Options{})
		l, err := s.Acquire(ctx, lease.Request{Attrs: vxlanAttrs})
		require.NoError(t, err)
		assert.Equal(t, "203.0.113.7", l.Attrs.PublicIP.String())
		assert.Equal(t, "203.0.113.7", getNode(t, cs, "acq-overwrite").Annotations[pfx+"public-ip"])
	})

	t.Run("no podCIDR until assigned", func(t *testing.T) {
		t.Parallel()
		s := newStore(t, cs, "acq-late", netConf4, kubestore.Options{})
		// The node does not exist yet.
		short, cancel := context.WithTimeout(ctx, 2*time.Second) // room for a loaded machine: the first Get must get through
		_, err := s.Acquire(short, lease.Request{Attrs: vxlanAttrs})
		cancel()
		require.ErrorIs(t, err, lease.ErrNotAssigned)
		assert.ErrorContains(t, err, "does not exist")

		n := createNode(t, cs, "acq-late", nil)
		short, cancel = context.WithTimeout(ctx, 2*time.Second)
		_, err = s.Acquire(short, lease.Request{Attrs: vxlanAttrs})
		cancel()
		require.ErrorIs(t, err, lease.ErrNotAssigned)
		assert.ErrorContains(t, err, "no podCIDR")

		// Assign while Acquire waits.
		got := make(chan error, 1)
		go func() {
			_, err := s.Acquire(ctx, lease.Request{Attrs: vxlanAttrs})
			got <- err
		}()
		n.Spec.PodCIDR, n.Spec.PodCIDRs = "10.244.6.0/24", []string{"10.244.6.0/24"}
		_, err = cs.CoreV1().Nodes().Update(ctx, n, metav1.UpdateOptions{})
		require.NoError(t, err)
		select {
		case err := <-got:
			require.NoError(t, err)
		case <-time.After(30 * time.Second):
			t.Fatal("Acquire did not return after the podCIDR was assigned")
		}
	})

	t.Run("podCIDR outside the network", func(t *testing.T) {
		t.Parallel()
		createNode(t, cs, "acq-outside", nil, "10.99.0.0/24")
		s := newStore(t, cs, "acq-outside", netConf4, kubestore.Options{})
		_, err := s.Acquire(ctx, lease.Request{Attrs: vxlanAttrs})
		require.Error(t, err)
		assert.NotErrorIs(t, err, lease.ErrNotAssigned)
		assert.ErrorContains(t, err, "podCIDR 10.99.0.0/24 is outside Network 10.244.0.0/16")
		assert.ErrorContains(t, err, "acq-outside")
	})

	t.Run("dual-stack network, single-stack node", func(t *testing.T) {
		t.Parallel()
		createNode(t, cs, "acq-onefamily", nil, "10.244.7.0/24")
		s := newStore(t, cs, "acq-onefamily", netConfDual, kubestore.Options{})
		_, err := s.Acquire(ctx, lease.Request{Attrs: vxlanAttrs})
		assert.ErrorContains(t, err, "no IPv6 podCIDR")
	})

	t.Run("node without annotations", func(t *testing.T) {
		t.Parallel()
		createNode(t, cs, "acq-bare", nil, "10.244.8.0/24")
		require.Nil(t, getNode(t, cs, "acq-bare").Annotations)
		s := newStore(t, cs, "acq-bare", netConf4, kubestore.Options{})
		_, err := s.Acquire(ctx, lease.Request{Attrs: vxlanAttrs})
		require.NoError(t, err)
		assert.Equal(t, "true", getNode(t, cs, "acq-bare").Annotations[pfx+"kube-subnet-manager"])
	})

	t.Run("custom prefix", func(t *testing.T) {
		t.Parallel()
		createNode(t, cs, "acq-prefix", nil, "10.244.9.0/24")
		s := newStore(t, cs, "acq-prefix", netConf4, kubestore.Options{AnnotationPrefix: "example.com/net"})
		_, err := s.Acquire(ctx, lease.Request{Attrs: vxlanAttrs})
		require.NoError(t, err)
		ann := getNode(t, cs, "acq-prefix").Annotations
		assert.Equal(t, "true", ann["example.com/net-kube-subnet-manager"])
		assert.Equal(t, "192.168.1.11", ann["example.com/net-public-ip"])
	})

	t.Run("mark ready", func(t *testing.T) {
		t.Parallel()
		createNode(t, cs, "acq-ready", nil, "10.244.10.0/24")
		s := newStore(t, cs, "acq-ready", netConf4, kubestore.Options{SetNodeNetworkUnavailable: true})
		l, err := s.Acquire(ctx, lease.Request{Attrs: vxlanAttrs})
		require.NoError(t, err)
		kctx, cancel := context.WithCancel(ctx)
		done := make(chan error, 1)
		go func() { done <- s.Keep(kctx, l) }()
		require.Eventually(t, func() bool {
			for _, c := range getNode(t, cs, "acq-ready").Status.Conditions {
				if c.Type == corev1.NodeNetworkUnavailable {
					return c.Status == corev1.ConditionFalse && c.Reason == "FlannelIsUp"
				}
			}
			return false
		}, 30*time.Second, 20*time.Millisecond)
		cancel()
		require.NoError(t, <-done)
	})

	t.Run("keep: node deleted", func(t *testing.T) {
		t.Parallel()
		createNode(t, cs, "keep-del", nil, "10.244.11.0/24")
		s := newStore(t, cs, "keep-del", netConf4, kubestore.Options{})
		l, err := s.Acquire(ctx, lease.Request{Attrs: vxlanAttrs})
		require.NoError(t, err)
		done := make(chan error, 1)
		go func() { done <- s.Keep(ctx, l) }()
		// Keep holds while the node is updated in unrelated ways.
		_, err = cs.CoreV1().Nodes().Patch(ctx, "keep-del", "application/merge-patch+json",
			[]byte(`{"metadata":{"labels":{"x":"y"}}}`), metav1.PatchOptions{})
		require.NoError(t, err)
		select {
		case err := <-done:
			t.Fatalf("Keep returned early: %v", err)
		case <-time.After(300 * time.Millisecond):
		}
		require.NoError(t, cs.CoreV1().Nodes().Delete(ctx, "keep-del", metav1.DeleteOptions{}))
		select {
		case err := <-done:
			require.ErrorIs(t, err, lease.ErrLeaseLost)
		case <-time.After(30 * time.Second):
			t.Fatal("Keep did not notice the deletion")
		}
	})

	t.Run("keep: podCIDR changed", func(t *testing.T) {
		t.Parallel()
		// The apiserver forbids changing a podCIDR in place; a node
		// re-created with another subnet is what happens in practice.
		createNode(t, cs, "keep-cidr", nil, "10.244.12.0/24")
		s := newStore(t, cs, "keep-cidr", netConf4, kubestore.Options{})
		l, err := s.Acquire(ctx, lease.Request{Attrs: vxlanAttrs})
		require.NoError(t, err)
		require.NoError(t, cs.CoreV1().Nodes().Delete(ctx, "keep-cidr", metav1.DeleteOptions{}))
		createNode(t, cs, "keep-cidr", nil, "10.244.13.0/24")
		err = s.Keep(ctx, l)
		require.ErrorIs(t, err, lease.ErrLeaseLost)
		assert.ErrorContains(t, err, "podCIDRs changed from 10.244.12.0/24 to 10.244.13.0/24")
	})
}

// TestWatch checks the peer set through adds, updates and deletes on its
// own apiserver (it sees every node there).
func TestWatch(t *testing.T) {
	srv := kubetest.NewT(t, kubetest.Options{})
	cs := kubetest.ClientT(t, srv.AdminConfig())
	ctx := context.Background()
	logs := &testenv.LogBuffer{}

	// An upstream node (node.json, status included) and a non-flannel node.
	createNodeJSON(t, cs, "testdata/node.json", "worker-1")
	createNode(t, cs, "not-flannel", nil, "10.244.50.0/24")

	s := newStore(t, cs, "me", netConfDual, kubestore.Options{Logger: logs.Logger()})
	// worker-1 is IPv4 only: in a dual-stack network it is malformed.
	s4 := newStore(t, cs, "me", netConf4, kubestore.Options{})
	w4 := storetest.Watch(t, s4)
	snap := w4.WaitFor(t, "worker-1", func(sn lease.Snapshot) bool { ls := sn.Leases; return len(ls) == 1 })
	assert.True(t, snap.Resync, "first snapshot is a resync")
	l := snap.Leases[0]
	assert.Equal(t, "10.244.3.0/24", l.Subnet.String())
	assert.True(t, l.Attrs.Equal(vxlanAttrs), "%+v", l.Attrs)
	w4.Stop(t)

	w := storetest.Watch(t, s)
	w.WaitFor(t, "empty dual-stack set", func(sn lease.Snapshot) bool { ls := sn.Leases; return len(ls) == 0 })
	storetest.Eventually(t, "a warning about worker-1", func() bool { return logs.HasLine("skipping node", "node=worker-1", "no IPv6 podCIDR") })

	// Add: two dual-stack nodes acquire.
	for i, name := range []string{"a", "b"} {
		v4 := []string{"10.244.1.0/24", "10.244.2.0/24"}[i]
		v6 := []string{"fd00:10:244:1::/64", "fd00:10:244:2::/64"}[i]
		createNode(t, cs, name, nil, v4, v6)
		ns := newStore(t, cs, name, netConfDual, kubestore.Options{})
		attrs := vxlanAttrs
		attrs.PublicIPv6 = netip.MustParseAddr("fd00::" + name)
		attrs.BackendV6Data = json.RawMessage(`{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:0` + name + `"}`)
		_, err := ns.Acquire(ctx, lease.Request{Attrs: attrs})
		require.NoError(t, err)
	}
	w.WaitFor(t, "a and b", func(sn lease.Snapshot) bool { ls := sn.Leases; return len(ls) == 2 })

	// Update of only the IPv6 backend data of b.
	_, err := cs.CoreV1().Nodes().Patch(ctx, "b", "application/merge-patch+json",
		[]byte(`{"metadata":{"annotations":{"`+pfx+`backend-v6-data":"{\"VNI\":1,\"VtepMAC\":\"7a:1e:6c:d2:4a:ff\"}"}}}`), metav1.PatchOptions{})
	require.NoError(t, err)
	w.WaitFor(t, "b's new v6 data", func(sn lease.Snapshot) bool {
		ls := sn.Leases
		b, ok := find(ls, "10.244.2.0/24")
		return ok && string(b.Attrs.BackendV6Data) == `{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:ff"}`
	})

	// Malformed annotation on a: skipped with a warning naming it.
	_, err = cs.CoreV1().Nodes().Patch(ctx, "a", "application/merge-patch+json",
		[]byte(`{"metadata":{"annotations":{"`+pfx+`public-ip":"not-an-ip"}}}`), metav1.PatchOptions{})
	require.NoError(t, err)
	w.WaitFor(t, "a skipped", func(sn lease.Snapshot) bool {
		ls := sn.Leases
		_, ok := find(ls, "10.244.1.0/24")
		return len(ls) == 1 && !ok
	})
	assert.True(t, logs.HasLine("skipping node", "node=a", "public-ip"))

	// Delete b.
	require.NoError(t, cs.CoreV1().Nodes().Delete(ctx, "b", metav1.DeleteOptions{}))
	w.WaitFor(t, "b deleted", func(sn lease.Snapshot) bool { ls := sn.Leases; return len(ls) == 0 })
}

func readFile(path string) ([]byte, error) { return os.ReadFile(path) }
