package kubestore_test

import (
	"context"
	"encoding/json"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/flannelkit/flannel/internal/kubetest"
	"github.com/flannelkit/flannel/kubestore"
	"github.com/flannelkit/flannel/lease"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m, kubetest.LeakOptions()...)
}

const (
	netConf4    = `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`
	netConfDual = `{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}`
)

func config(t *testing.T, conf string) lease.Config {
	t.Helper()
	c, err := lease.ParseConfig([]byte(conf))
	require.NoError(t, err)
	return c
}

func newStore(t *testing.T, cs kubernetes.Interface, node, conf string, opts kubestore.Options) *kubestore.Store {
	t.Helper()
	return newStoreWith(t, cs.CoreV1().Nodes(), node, conf, opts)
}

func newStoreWith(t *testing.T, nodes kubestore.NodeClient, node, conf string, opts kubestore.Options) *kubestore.Store {
	t.Helper()
	opts.NodeName = node
	opts.Config = config(t, conf)
	if opts.PollInterval == 0 {
		opts.PollInterval = 20 * time.Millisecond
	}
	if opts.RetryMin == 0 {
		opts.RetryMin, opts.RetryMax = 50*time.Millisecond, time.Second
	}
	s, err := kubestore.New(nodes, opts)
	require.NoError(t, err)
	return s
}

// createNode creates a Node with the given podCIDRs and annotations.
func createNode(t *testing.T, cs kubernetes.Interface, name string, ann map[string]string, cidrs ...string) *corev1.Node {
	t.Helper()
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Annotations: ann}}
	if len(cidrs) > 0 {
		n.Spec.PodCIDR, n.Spec.PodCIDRs = cidrs[0], cidrs
	}
	got, err := cs.CoreV1().Nodes().Create(context.Background(), n, metav1.CreateOptions{})
	require.NoError(t, err)
	return got
}

// createNodeJSON creates a Node from a JSON file (status included).
func createNodeJSON(t *testing.T, cs kubernetes.Interface, path, name string) *corev1.Node {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	var n corev1.Node
	require.NoError(t, json.Unmarshal(b, &n))
	n.Name = name
	got, err := cs.CoreV1().Nodes().Create(context.Background(), &n, metav1.CreateOptions{})
	require.NoError(t, err)
	return got
}

func getNode(t *testing.T, cs kubernetes.Interface, name string) *corev1.Node {
	t.Helper()
	n, err := cs.CoreV1().Nodes().Get(context.Background(), name, metav1.GetOptions{})
	require.NoError(t, err)
	return n
}

// flannelAnnotations returns the annotations under the default prefix.
func flannelAnnotations(n *corev1.Node) map[string]string {
	out := map[string]string{}
	for k, v := range n.Annotations {
		if strings.HasPrefix(k, kubestore.DefaultAnnotationPrefix+"/") {
			out[k] = v
		}
	}
	return out
}

// find returns the lease with the given IPv4 subnet.
func find(ls []lease.Lease, subnet string) (lease.Lease, bool) {
	for _, l := range ls {
		if l.Subnet.String() == subnet {
			return l, true
		}
	}
	return lease.Lease{}, false
}
