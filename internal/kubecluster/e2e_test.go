package kubecluster_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/flannelkit/flannel/internal/cnilab"
	"github.com/flannelkit/flannel/internal/image"
	"github.com/flannelkit/flannel/internal/kubecluster"
	"github.com/flannelkit/flannel/internal/testenv"
)

// flannelImage builds the flanneld image once per test binary.
type builtImage struct {
	once sync.Once
	tar  string
	ref  string
	err  error
}

func (b *builtImage) get(t *testing.T, dir, tag string) (string, string) {
	t.Helper()
	b.once.Do(func() {
		root, err := testenv.RepoRoot()
		if err != nil {
			b.err = err
			return
		}
		b.tar = filepath.Join(dir, strings.ReplaceAll(filepath.Base(tag), ":", "_")+image.OCISuffix)
		var res image.Result
		res, b.err = image.Build(context.Background(), image.Options{
			Repo: root, Go: filepath.Join(runtime.GOROOT(), "bin", "go"), CNIPlugins: cnilab.PluginDir(t),
			Tag: tag, Out: b.tar, Version: "e2e",
		})
		b.ref = tag + "@" + res.Digest.String()
	})
	require.NoError(t, b.err)
	return b.tar, b.ref
}

func netConf(backend string, dual bool) string {
	if dual {
		return `{"EnableIPv6": true, "Network": "10.244.0.0/16", "IPv6Network": "fd00:10:244::/56", "Backend": {"Type": "` + backend + `"}}`
	}
	return `{"Network": "10.244.0.0/16", "Backend": {"Type": "` + backend + `"}}`
}

// deployFlannel applies the real manifest with the image pinned by digest
// and waits until every node is Ready.
func deployFlannel(t *testing.T, c *kubecluster.Cluster, ref, conf string) {
	t.Helper()
	root, err := testenv.RepoRoot()
	require.NoError(t, err)
	m, err := kubecluster.FlannelManifest(filepath.Join(root, "deploy", "kube-flannel.yaml"), ref, conf)
	require.NoError(t, err)
	ctx := t.Context()
	require.NoError(t, c.Apply(ctx, m))
	err = c.WaitReady(ctx, 90*time.Second)
	if err == nil {
		err = c.WaitDaemonSet(ctx, "kube-flannel", "kube-flannel-ds", 90*time.Second)
	}
	if err != nil {
		pods, _ := c.Client().CoreV1().Pods("kube-flannel").List(ctx, metav1.ListOptions{})
		for _, p := range pods.Items {
			t.Logf("flannel pod %s on %s: %s %v", p.Name, p.Spec.NodeName, p.Status.Phase, p.Status.ContainerStatuses)
			t.Logf("log:\n%s", c.PodLog(ctx, "kube-flannel", p.Name, "kube-flannel", 30))
		}
		ds, derr := c.Client().AppsV1().DaemonSets("kube-flannel").Get(ctx, "kube-flannel-ds", metav1.GetOptions{})
		if derr == nil {
			t.Logf("daemonset status %+v", ds.Status)
		}
		evs, _ := c.Client().CoreV1().Events("kube-flannel").List(ctx, metav1.ListOptions{})
		for _, e := range evs.Items {
			t.Logf("event %s %s: %s", e.InvolvedObject.Name, e.Reason, e.Message)
		}
		t.Logf("controller manager:\n%s", c.Log("kube-controller-manager", 30))
		for _, n := range c.Nodes {
			t.Logf("%s containerd:\n%s", n.Name, n.Log("containerd", 15))
		}
		if os.Getenv("FLANNEL_KC_DEBUG") == "1" {
			for _, n := range c.Nodes {
				t.Logf("%s: dir %s holder pid %d", n.Name, n.Dir, n.HolderPID())
			}
			time.Sleep(5 * time.Minute)
		}
		t.Fatal(err)
	}
}

var flanneld builtImage

func TestFlannelOnKubelets(t *testing.T) {
	for _, tc := range []struct {
		backend string
		dual    bool
		nodes   int
	}{{"vxlan", false, 3}, {"host-gw", false, 2}, {"vxlan", true, 2}, {"host-gw", true, 2}} {
		t.Run(fmt.Sprintf("%s/dual=%v", tc.backend, tc.dual), func(t *testing.T) {
			tar, ref := flanneld.get(t, t.TempDir(), "ghcr.io/flannelkit/flanneld:e2e")
			o := kubecluster.Options{Nodes: tc.nodes, Images: []string{tar}}
			if tc.dual {
				o.PodCIDRv6 = "fd00:10:244::/56"
			}
			c := kubecluster.NewT(t, o)
			deployFlannel(t, c, ref, netConf(tc.backend, tc.dual))
			ctx := t.Context()
			var pods []string
			for _, n := range c.Nodes {
				pods = append(pods, "pod-"+n.Name)
			}
			var specs []*corev1.Pod
			for i, n := range c.Nodes {
				specs = append(specs, kubecluster.BusyboxPod(pods[i], n.Name, nil))
			}
			running, err := c.RunPods(ctx, "default", specs...)
			require.NoError(t, err)
			for i, from := range running {
				for j, to := range running {
					if i == j {
						continue
					}
					for _, ip := range to.Status.PodIPs {
						assert.NoError(t, c.Reach(ctx, "default", from.Name, ip.IP, 8080, to.Name), "%s -> %s", from.Name, to.Name)
					}
				}
				if tc.dual {
					assert.Len(t, from.Status.PodIPs, 2, "dual-stack pod %s", from.Name)
				}
			}
		})
	}
}
