package kubecluster_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
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
			Repo: root, Go: testenv.GoBinary(), CNIPlugins: cnilab.PluginDir(t),
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

// imageDir holds the images built for the whole test binary.
var imageDir string

func TestMain(m *testing.M) {
	var err error
	if imageDir, err = os.MkdirTemp("", "kubecluster-images-"); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(imageDir)
	os.Exit(code)
}

func TestFlannelOnKubelets(t *testing.T) {
	for _, tc := range []struct {
		backend string
		dual    bool
		nodes   int
	}{{"vxlan", false, 3}, {"host-gw", false, 2}, {"vxlan", true, 2}, {"host-gw", true, 2}} {
		t.Run(fmt.Sprintf("%s/dual=%v", tc.backend, tc.dual), func(t *testing.T) {
			tar, ref := flanneld.get(t, imageDir, "ghcr.io/flannelkit/flanneld:e2e")
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
			checkFlannelLogs(t, c)
			if tc.nodes == 3 {
				checkServicesAndResilience(t, c, running)
				checkFlannelLogs(t, c)
			}
		})
	}
}

var flanneld2 builtImage

// stream pings dst from pod at 100 packets/s for d in the background and
// returns a function that waits for it and gives sent and received.
func stream(t *testing.T, c *kubecluster.Cluster, pod, dst string, d time.Duration) func() (int, int) {
	t.Helper()
	n := int(d / (10 * time.Millisecond))
	type res struct {
		out string
		err error
	}
	done := make(chan res, 1)
	go func() {
		out, err := c.Exec(context.Background(), "default", pod, "ping", "-i", "0.01", "-c", fmt.Sprint(n), "-W", "2", dst)
		done <- res{out, err}
	}()
	return func() (int, int) {
		r := <-done
		sent, recv, err := kubecluster.PingStats(r.out)
		require.NoError(t, err, "ping stream %s -> %s: %v", pod, dst, r.err)
		return sent, recv
	}
}

// checkServicesAndResilience runs on a 3-node cluster with flannel and one
// busybox pod per node (pods[i] on node i).
func checkServicesAndResilience(t *testing.T, c *kubecluster.Cluster, pods []*corev1.Pod) {
	ctx := t.Context()
	require.Len(t, pods, 3)
	// A ClusterIP Service whose pod is on node1, reached from node0; its
	// name resolved by CoreDNS (on node1) for a pod on node2.
	web := kubecluster.BusyboxPod("web", c.Nodes[1].Name, map[string]string{"app": "web"})
	_, err := c.RunPods(ctx, "default", web)
	require.NoError(t, err)
	require.NoError(t, c.Apply(ctx, kubecluster.ServiceManifest("web")))
	require.NoError(t, c.Apply(ctx, kubecluster.CoreDNSManifest(c.Nodes[1].Name)))
	require.NoError(t, c.WaitDeployment(ctx, "kube-system", "coredns", 2*time.Minute))
	svc, err := c.Client().CoreV1().Services("default").Get(ctx, "web", metav1.GetOptions{})
	require.NoError(t, err)
	require.Eventually(t, func() bool {
		out, err := c.HTTPGet(ctx, "default", pods[0].Name, svc.Spec.ClusterIP, 80)
		return err == nil && out == "web"
	}, time.Minute, time.Second, "pod on %s reaches Service web %s (pod on %s)", c.Nodes[0].Name, svc.Spec.ClusterIP, c.Nodes[1].Name)
	var dns string
	require.Eventually(t, func() bool {
		dns, err = c.Exec(ctx, "default", pods[2].Name, "nslookup", "web.default.svc.cluster.local")
		return err == nil && strings.Contains(dns, svc.Spec.ClusterIP)
	}, time.Minute, time.Second, "CoreDNS resolves web for a pod on %s: %s %v", c.Nodes[2].Name, dns, err)

	// Deleting a pod frees its address in host-local's store.
	tmp, err := c.RunPods(ctx, "default", kubecluster.BusyboxPod("tmp", c.Nodes[0].Name, nil))
	require.NoError(t, err)
	ip := tmp[0].Status.PodIP
	require.True(t, c.Nodes[0].HostLocalHolds(ip))
	require.NoError(t, c.Client().CoreV1().Pods("default").Delete(ctx, "tmp", metav1.DeleteOptions{}))
	require.Eventually(t, func() bool { return !c.Nodes[0].HostLocalHolds(ip) }, time.Minute, 200*time.Millisecond, "host-local still holds %s", ip)

	// kubelet, containerd and flanneld of node1 killed and started again:
	// its pods stay reachable (no packet lost) and keep their addresses.
	n1 := c.Nodes[1]
	wait := stream(t, c, pods[0].Name, pods[1].Status.PodIP, 20*time.Second)
	time.Sleep(2 * time.Second)
	n1.Kill("kubelet", syscall.SIGKILL)
	n1.Kill("containerd", syscall.SIGKILL)
	assert.Positive(t, n1.KillProcess("flanneld", syscall.SIGKILL), "flanneld killed")
	time.Sleep(2 * time.Second)
	require.NoError(t, n1.StartContainerd(ctx))
	require.NoError(t, n1.StartKubelet())
	sent, recv := wait()
	assert.Equal(t, sent, recv, "packets lost while node1's kubelet, containerd and flanneld restarted")
	require.NoError(t, c.WaitDaemonSet(ctx, "kube-flannel", "kube-flannel-ds", 4*time.Minute))
	again, err := c.Client().CoreV1().Pods("default").Get(ctx, pods[1].Name, metav1.GetOptions{})
	require.NoError(t, err)
	assert.Equal(t, pods[1].Status.PodIP, again.Status.PodIP, "pod keeps its address")
	require.NoError(t, c.Reach(ctx, "default", pods[0].Name, pods[1].Status.PodIP, 8080, pods[1].Name))

	// A rolling update of the DaemonSet to a new image tag loses no packet
	// of a 100 packets/s stream, and every node keeps its subnet.
	before := map[string]string{}
	for _, n := range c.Nodes {
		before[n.Name], err = n.SubnetEnv()
		require.NoError(t, err)
	}
	tar2, ref2 := flanneld2.get(t, imageDir, "ghcr.io/flannelkit/flanneld:e2e-next")
	require.NoError(t, c.ImportImage(ctx, tar2))
	ds, err := c.Client().AppsV1().DaemonSets("kube-flannel").Get(ctx, "kube-flannel-ds", metav1.GetOptions{})
	require.NoError(t, err)
	wait = stream(t, c, pods[0].Name, pods[2].Status.PodIP, 25*time.Second)
	wait1 := stream(t, c, pods[2].Name, pods[1].Status.PodIP, 25*time.Second)
	for i := range ds.Spec.Template.Spec.InitContainers {
		ds.Spec.Template.Spec.InitContainers[i].Image = ref2
	}
	ds.Spec.Template.Spec.Containers[0].Image = ref2
	_, err = c.Client().AppsV1().DaemonSets("kube-flannel").Update(ctx, ds, metav1.UpdateOptions{})
	require.NoError(t, err)
	// A rolling update replaces one pod at a time (init containers,
	// flanneld, readiness): generous for a loaded 2-core machine.
	require.NoError(t, c.WaitDaemonSet(ctx, "kube-flannel", "kube-flannel-ds", 5*time.Minute))
	sent, recv = wait()
	assert.Equal(t, sent, recv, "packets lost %s -> %s during the rolling update", pods[0].Name, pods[2].Name)
	sent, recv = wait1()
	assert.Equal(t, sent, recv, "packets lost %s -> %s during the rolling update", pods[2].Name, pods[1].Name)
	for _, n := range c.Nodes {
		after, err := n.SubnetEnv()
		require.NoError(t, err)
		assert.Equal(t, before[n.Name], after, "%s keeps its FLANNEL_SUBNET", n.Name)
	}
	fl, err := c.Client().CoreV1().Pods("kube-flannel").List(ctx, metav1.ListOptions{})
	require.NoError(t, err)
	for _, p := range fl.Items {
		assert.Equal(t, ref2, p.Spec.Containers[0].Image)
	}
}

// checkFlannelLogs: the daemons run under the manifest's ServiceAccount
// and nothing they asked for was forbidden.
func checkFlannelLogs(t *testing.T, c *kubecluster.Cluster) {
	t.Helper()
	ctx := t.Context()
	fl, err := c.Client().CoreV1().Pods("kube-flannel").List(ctx, metav1.ListOptions{})
	require.NoError(t, err)
	require.Len(t, fl.Items, len(c.Nodes))
	for _, p := range fl.Items {
		assert.Equal(t, "flannel", p.Spec.ServiceAccountName)
		log := c.PodLog(ctx, "kube-flannel", p.Name, "kube-flannel", 10000)
		assert.NotContains(t, strings.ToLower(log), "forbidden", "pod %s log", p.Name)
		assert.NotContains(t, log, "level=ERROR", "pod %s log", p.Name)
	}
}
