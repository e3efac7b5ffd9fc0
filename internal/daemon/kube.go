package daemon

import (
	"context"
	"fmt"
	"log/slog"
	"os"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/flannelkit/flannel/internal/kubeclient"
	"github.com/flannelkit/flannel/kubestore"
	"github.com/flannelkit/flannel/lease"
)

// newKubeStore builds the Kubernetes store as the --kube-* flags say: the
// API from --kube-api-url/--kubeconfig-file (in-cluster when both are
// empty), the node from NODE_NAME or the pod's own node, the network
// config from --net-config-path.
func newKubeStore(ctx context.Context, c Config, log *slog.Logger) (*storeSetup, error) {
	netConf, err := os.ReadFile(c.NetConfigPath)
	if err != nil {
		return nil, fmt.Errorf("network config: %w", err)
	}
	cfg, err := lease.ParseConfig(netConf)
	if err != nil {
		return nil, fmt.Errorf("network config %s: %w", c.NetConfigPath, err)
	}
	var rc *rest.Config
	if c.KubeAPIURL == "" && c.KubeconfigFile == "" {
		rc, err = rest.InClusterConfig()
	} else {
		rc, err = clientcmd.BuildConfigFromFlags(c.KubeAPIURL, c.KubeconfigFile)
	}
	if err != nil {
		return nil, fmt.Errorf("kubernetes client config: %w", err)
	}
	client, err := kubeclient.New(rc)
	if err != nil {
		return nil, fmt.Errorf("kubernetes client: %w", err)
	}
	node := c.NodeName
	if node == "" {
		pod, err := client.Pod(ctx, c.PodNamespace, c.PodName, metav1.GetOptions{})
		if err != nil {
			return nil, fmt.Errorf("find this node from pod %s/%s: %w", c.PodNamespace, c.PodName, err)
		}
		node = pod.Spec.NodeName
	}
	store, err := kubestore.New(client.Nodes(), kubestore.Options{
		NodeName: node, Config: cfg, AnnotationPrefix: c.KubeAnnotationPrefix,
		SetNodeNetworkUnavailable: c.SetNodeNetworkUnavailable,
		Logger:                    log.With("component", "kube-store"),
	})
	if err != nil {
		return nil, err
	}
	return &storeSetup{store: store, where: c.NetConfigPath, close: func() {}, publicIPs: store.StoredPublicIPs}, nil
}
