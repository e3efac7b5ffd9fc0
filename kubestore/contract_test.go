package kubestore_test

import (
	"fmt"
	"log/slog"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/internal/kubeclient"
	"github.com/flannelkit/flannel/internal/kubetest"
	"github.com/flannelkit/flannel/internal/storetest"
	"github.com/flannelkit/flannel/kubestore"
	"github.com/flannelkit/flannel/lease"
)

// TestContract runs the store suite on one kube-apiserver, with the stores
// talking through a clientset and through the daemon's core/v1-only
// client; Nodes are cluster-wide, so the subtests run one at a time and
// each starts with no Nodes.
func TestContract(t *testing.T) {
	srv := kubetest.NewT(t, kubetest.Options{})
	cs := kubetest.ClientT(t, srv.AdminConfig())
	lean, err := kubeclient.New(srv.AdminConfig())
	require.NoError(t, err)
	for _, tc := range []struct {
		name  string
		nodes kubestore.NodeClient
	}{
		{"clientset", cs.CoreV1().Nodes()},
		{"kubeclient", lean.Nodes()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			storetest.Run(t, storetest.Factory{Sequential: true, New: func(t *testing.T, conf string) storetest.Cluster {
				require.NoError(t, cs.CoreV1().Nodes().DeleteCollection(t.Context(), metav1.DeleteOptions{}, metav1.ListOptions{}))
				return &kubeCluster{srv: srv, cs: cs, nodes: tc.nodes, conf: conf, cfg: storetest.Config(t, conf)}
			}})
		})
	}
}

type kubeCluster struct {
	srv   *kubetest.Server
	cs    kubernetes.Interface // the fixtures' client
	nodes kubestore.NodeClient // the stores' client
	conf  string
	cfg   lease.Config
}

func nodeName(i int) string { return fmt.Sprintf("node-%d", i) }

func (c *kubeCluster) newStore(t *testing.T, node string, log *slog.Logger) *kubestore.Store {
	return newStoreWith(t, c.nodes, node, c.conf, kubestore.Options{Logger: log})
}

// Store creates node i's Node with podCIDR storetest.Subnet(i) (as the
// controller manager would) unless it exists.
func (c *kubeCluster) Store(t *testing.T, i int, log *slog.Logger) flannel.LeaseStore {
	n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: nodeName(i)}}
	p := storetest.Subnet(c.cfg, i).String()
	n.Spec.PodCIDR, n.Spec.PodCIDRs = p, []string{p}
	_, err := c.cs.CoreV1().Nodes().Create(t.Context(), n, metav1.CreateOptions{})
	if !apierrors.IsAlreadyExists(err) {
		require.NoError(t, err)
	}
	return c.newStore(t, nodeName(i), log)
}

func (c *kubeCluster) Write(t *testing.T, name string, l lease.Lease) string {
	ann := map[string]string{
		pfx + "kube-subnet-manager": "true",
		pfx + "backend-type":        l.Attrs.BackendType,
		pfx + "public-ip":           l.Attrs.PublicIP.String(),
		pfx + "backend-data":        string(l.Attrs.BackendData),
	}
	var cidrs []string
	for _, p := range []string{l.Subnet.String(), l.IPv6Subnet.String()} {
		if p != "invalid Prefix" {
			cidrs = append(cidrs, p)
		}
	}
	createNode(t, c.cs, name, ann, cidrs...)
	return name
}

func (c *kubeCluster) WriteMalformed(t *testing.T, name string) string {
	createNode(t, c.cs, name, map[string]string{
		pfx + "kube-subnet-manager": "true",
		pfx + "backend-type":        "vxlan",
		pfx + "public-ip":           "not-an-address",
	}, storetest.Subnet(c.cfg, 30).String())
	return name
}

func (c *kubeCluster) Delete(t *testing.T, i int) {
	require.NoError(t, c.cs.CoreV1().Nodes().Delete(t.Context(), nodeName(i), metav1.DeleteOptions{}))
}

func (c *kubeCluster) Caps() storetest.Caps {
	return storetest.Caps{
		Unassigned: func(t *testing.T) flannel.LeaseStore {
			createNode(t, c.cs, "unassigned", nil)
			return newStoreWith(t, c.nodes, "unassigned", c.conf, kubestore.Options{PollInterval: 20 * time.Millisecond})
		},
		Gap: func(t *testing.T) {
			c.srv.Stop()
			require.NoError(t, c.srv.Start())
		},
	}
}
