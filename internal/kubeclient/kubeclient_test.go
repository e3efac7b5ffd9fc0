package kubeclient_test

import (
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/flannelkit/flannel/internal/kubeclient"
	"github.com/flannelkit/flannel/internal/kubetest"
	"github.com/flannelkit/flannel/kubestore"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, kubetest.LeakOptions()...)
}

var _ kubestore.NodeClient = kubeclient.Nodes{}

// TestAgainstAPIServer reads, lists, watches and patches Nodes and reads a
// Pod on a real kube-apiserver, comparing with what a clientset sees.
func TestAgainstAPIServer(t *testing.T) {
	srv := kubetest.NewT(t, kubetest.Options{})
	cs := kubetest.ClientT(t, srv.AdminConfig())
	c, err := kubeclient.New(srv.AdminConfig())
	require.NoError(t, err)
	ctx := t.Context()
	nodes := c.Nodes()

	_, err = nodes.Get(ctx, "absent", metav1.GetOptions{})
	require.True(t, apierrors.IsNotFound(err), "a missing Node is a NotFound status error, got %v", err)

	for _, name := range []string{"n1", "n2"} {
		_, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{"k": name}},
			Spec:       corev1.NodeSpec{PodCIDR: "10.244.1.0/24", PodCIDRs: []string{"10.244.1.0/24"}},
		}, metav1.CreateOptions{})
		require.NoError(t, err)
	}
	n, err := nodes.Get(ctx, "n1", metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, "10.244.1.0/24", n.Spec.PodCIDR)

	// List honours selectors (the options reach the server as parameters).
	l, err := nodes.List(ctx, metav1.ListOptions{LabelSelector: "k=n2"})
	require.NoError(t, err)
	require.Len(t, l.Items, 1)
	require.Equal(t, "n2", l.Items[0].Name)
	all, err := nodes.List(ctx, metav1.ListOptions{})
	require.NoError(t, err)
	require.Len(t, all.Items, 2)

	// A watch from the list's version sees a patch of n1 and not of n2.
	w, err := nodes.Watch(ctx, metav1.ListOptions{
		ResourceVersion: all.ResourceVersion,
		FieldSelector:   fields.OneTermEqualSelector("metadata.name", "n1").String(),
	})
	require.NoError(t, err)
	defer w.Stop()
	_, err = nodes.Patch(ctx, "n2", types.MergePatchType, []byte(`{"metadata":{"annotations":{"a":"2"}}}`), metav1.PatchOptions{})
	require.NoError(t, err)
	got, err := nodes.Patch(ctx, "n1", types.MergePatchType, []byte(`{"metadata":{"annotations":{"a":"1"}}}`), metav1.PatchOptions{})
	require.NoError(t, err)
	require.Equal(t, "1", got.Annotations["a"])
	select {
	case ev := <-w.ResultChan():
		require.Equal(t, watch.Modified, ev.Type)
		node, ok := ev.Object.(*corev1.Node)
		require.True(t, ok, "watch event object %T", ev.Object)
		require.Equal(t, "n1", node.Name)
		require.Equal(t, "1", node.Annotations["a"])
	case <-time.After(30 * time.Second):
		t.Fatal("no watch event for the patched Node")
	}

	// A status patch goes to the status subresource.
	_, err = nodes.Patch(ctx, "n1", types.StrategicMergePatchType,
		[]byte(`{"status":{"conditions":[{"type":"NetworkUnavailable","status":"False","reason":"FlannelIsUp"}]}}`),
		metav1.PatchOptions{}, "status")
	require.NoError(t, err)
	viaCS, err := cs.CoreV1().Nodes().Get(ctx, "n1", metav1.GetOptions{})
	require.NoError(t, err)
	require.Len(t, viaCS.Status.Conditions, 1)
	require.Equal(t, "FlannelIsUp", viaCS.Status.Conditions[0].Reason)

	// Pods: the daemon finds its node from its own pod.
	_, err = srv.PodServiceAccountConfig(ctx, "kube-flannel", "flannel", "n2")
	require.NoError(t, err)
	pod, err := c.Pod(ctx, "kube-flannel", "flannel-n2", metav1.GetOptions{})
	require.NoError(t, err)
	require.Equal(t, "n2", pod.Spec.NodeName)
	_, err = c.Pod(ctx, "kube-flannel", "absent", metav1.GetOptions{})
	require.True(t, apierrors.IsNotFound(err), "got %v", err)
}
