package kubecluster

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/remotecommand"

	"github.com/flannelkit/flannel/internal/kubetest"
)

// FlannelManifest is deploy/kube-flannel.yaml with the image replaced by
// ref (pinned by digest) and the net-conf.json replaced by netConf.
func FlannelManifest(path, ref, netConf string) ([]byte, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	s := strings.ReplaceAll(string(b), "ghcr.io/flannelkit/flanneld:latest", ref)
	start := strings.Index(s, "  net-conf.json: |\n")
	if start < 0 {
		return nil, fmt.Errorf("%s: no net-conf.json", path)
	}
	end := strings.Index(s[start:], "\n---")
	if end < 0 {
		return nil, fmt.Errorf("%s: net-conf.json is not followed by another object", path)
	}
	var nc strings.Builder
	nc.WriteString("  net-conf.json: |\n")
	for _, l := range strings.Split(strings.TrimSpace(netConf), "\n") {
		nc.WriteString("    " + l + "\n")
	}
	return []byte(s[:start] + strings.TrimRight(nc.String(), "\n") + s[start+end:]), nil
}

// Apply server-side-applies a manifest with the admin identity.
func (c *Cluster) Apply(ctx context.Context, manifest []byte) error {
	_, err := kubetest.Apply(ctx, c.Admin, manifest, kubetest.ApplyOptions{})
	return err
}

// BusyboxPod is a pod on node running the busybox image: an HTTP server on
// port 8080 answering with the pod's name, and nothing else.
func BusyboxPod(name, node string, labels map[string]string) *corev1.Pod {
	zero := int64(0)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
		Spec: corev1.PodSpec{
			NodeName:                      node,
			TerminationGracePeriodSeconds: &zero,
			Containers: []corev1.Container{{
				Name:            "main",
				Image:           BusyboxImage,
				ImagePullPolicy: corev1.PullNever,
				Command:         []string{"/bin/sh", "-c", "mkdir -p /www && echo " + name + " > /www/index.html && exec httpd -f -p 8080 -h /www"},
				ReadinessProbe: &corev1.Probe{
					ProbeHandler:  corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(8080)}},
					PeriodSeconds: 1,
				},
			}},
		},
	}
}

// RunPods creates pods and waits until they are ready with their
// addresses.
func (c *Cluster) RunPods(ctx context.Context, ns string, pods ...*corev1.Pod) ([]*corev1.Pod, error) {
	for _, p := range pods {
		if _, err := c.client.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{}); err != nil {
			return nil, fmt.Errorf("create pod %s: %w", p.Name, err)
		}
	}
	out := make([]*corev1.Pod, len(pods))
	for i, p := range pods {
		err := c.waitFor(ctx, 2*time.Minute, "pod "+p.Name+" running", func() (bool, error) {
			got, err := c.client.CoreV1().Pods(ns).Get(ctx, p.Name, metav1.GetOptions{})
			if err != nil {
				return false, nil
			}
			out[i] = got
			ready := false
			for _, cond := range got.Status.Conditions {
				if cond.Type == corev1.PodReady && cond.Status == corev1.ConditionTrue {
					ready = true
				}
			}
			return got.Status.Phase == corev1.PodRunning && ready && len(got.Status.PodIPs) > 0, nil
		})
		if err != nil {
			return nil, fmt.Errorf("%w: %s", err, c.describe(ctx, ns, p.Name))
		}
	}
	return out, nil
}

// describe is a pod's status and events, for errors.
func (c *Cluster) describe(ctx context.Context, ns, name string) string {
	var b strings.Builder
	if p, err := c.client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{}); err == nil {
		fmt.Fprintf(&b, "phase %s on %s, conditions %v, containers %v", p.Status.Phase, p.Spec.NodeName, p.Status.Conditions, p.Status.ContainerStatuses)
	}
	evs, err := c.client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + name})
	if err == nil {
		for _, e := range evs.Items {
			fmt.Fprintf(&b, "\n  event %s: %s", e.Reason, e.Message)
		}
	}
	return b.String()
}

// Exec runs a command in a pod's container and returns its stdout followed
// by its stderr; a non-zero exit is an error holding the output.
func (c *Cluster) Exec(ctx context.Context, ns, pod string, cmd ...string) (string, error) {
	req := c.client.CoreV1().RESTClient().Post().Resource("pods").Namespace(ns).Name(pod).SubResource("exec").
		VersionedParams(&corev1.PodExecOptions{Container: "main", Command: cmd, Stdout: true, Stderr: true}, scheme.ParameterCodec)
	ex, err := remotecommand.NewSPDYExecutor(c.Admin, "POST", req.URL())
	if err != nil {
		return "", err
	}
	// Separate buffers: the streams are copied from goroutines of their own.
	var stdout, stderr bytes.Buffer
	err = ex.StreamWithContext(ctx, remotecommand.StreamOptions{Stdout: &stdout, Stderr: &stderr})
	out := stdout.String() + stderr.String()
	if err != nil {
		return out, fmt.Errorf("exec %v in %s: %w: %s", cmd, pod, err, out)
	}
	return out, nil
}

// Reach checks from pod `from` that ip answers ICMP echo and serves the
// busybox pod's HTTP page on port (TCP; through nc, since the static
// busybox's wget crashes in glibc's NSS once /etc/hosts exists).
func (c *Cluster) Reach(ctx context.Context, ns, from, ip string, port int, want string) error {
	if _, err := c.Exec(ctx, ns, from, "ping", "-c", "1", "-W", "3", ip); err != nil {
		return fmt.Errorf("icmp %s -> %s: %w", from, ip, err)
	}
	body, err := c.HTTPGet(ctx, ns, from, ip, port)
	if err != nil {
		return fmt.Errorf("tcp %s -> %s: %w", from, ip, err)
	}
	if want != "" && body != want {
		return fmt.Errorf("tcp %s -> %s: got %q, want %q", from, ip, body, want)
	}
	return nil
}

// HTTPGet fetches / from ip:port in pod `from` and returns the body's last
// line.
func (c *Cluster) HTTPGet(ctx context.Context, ns, from, ip string, port int) (string, error) {
	out, err := c.Exec(ctx, ns, from, "sh", "-c", fmt.Sprintf(`printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 5 %s %d`, ip, port))
	if err != nil {
		return "", err
	}
	lines := strings.Split(strings.TrimSpace(strings.ReplaceAll(out, "\r", "")), "\n")
	if len(lines) == 0 || !strings.HasPrefix(lines[0], "HTTP/1.") {
		return "", fmt.Errorf("no HTTP answer: %q", out)
	}
	return strings.TrimSpace(lines[len(lines)-1]), nil
}

// WaitDaemonSet waits until a DaemonSet's pods are ready on every node it
// wants them on, at its current generation.
// A timeout error says where the DaemonSet stood and what its pods were
// doing.
func (c *Cluster) WaitDaemonSet(ctx context.Context, ns, name string, d time.Duration) error {
	var last string
	err := c.waitFor(ctx, d, "daemonset "+ns+"/"+name+" ready", func() (bool, error) {
		ds, err := c.client.AppsV1().DaemonSets(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			last = err.Error()
			return false, nil
		}
		s := ds.Status
		last = fmt.Sprintf("generation %d observed %d, desired %d, updated %d, ready %d, available %d",
			ds.Generation, s.ObservedGeneration, s.DesiredNumberScheduled, s.UpdatedNumberScheduled, s.NumberReady, s.NumberAvailable)
		return s.ObservedGeneration >= ds.Generation && s.DesiredNumberScheduled == int32(len(c.Nodes)) &&
			s.UpdatedNumberScheduled == s.DesiredNumberScheduled && s.NumberReady == s.DesiredNumberScheduled && s.NumberAvailable == s.DesiredNumberScheduled, nil
	})
	if err != nil {
		return fmt.Errorf("%w (%s)\n%s", err, last, c.podStates(ctx, ns))
	}
	return nil
}

// podStates renders each pod of namespace ns: node, phase, and each
// container's readiness, restarts and waiting or termination reason.
func (c *Cluster) podStates(ctx context.Context, ns string) string {
	pods, err := c.client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
	if err != nil {
		return "pods: " + err.Error()
	}
	var b strings.Builder
	for _, p := range pods.Items {
		fmt.Fprintf(&b, "pod %s on %s: %s", p.Name, p.Spec.NodeName, p.Status.Phase)
		for _, cs := range append(slices.Clone(p.Status.InitContainerStatuses), p.Status.ContainerStatuses...) {
			fmt.Fprintf(&b, "; %s ready=%t restarts=%d", cs.Name, cs.Ready, cs.RestartCount)
			if w := cs.State.Waiting; w != nil {
				fmt.Fprintf(&b, " waiting %s %s", w.Reason, w.Message)
			}
			if x := cs.State.Terminated; x != nil {
				fmt.Fprintf(&b, " terminated %s exit %d", x.Reason, x.ExitCode)
			}
		}
		b.WriteString("\n")
	}
	return b.String()
}

// PodLog is the tail of a container's log, read from its node's
// /var/log/pods (all restarts).
func (c *Cluster) PodLog(ctx context.Context, ns, pod, container string, lines int) string {
	p, err := c.client.CoreV1().Pods(ns).Get(ctx, pod, metav1.GetOptions{})
	if err != nil {
		return err.Error()
	}
	for _, n := range c.Nodes {
		if n.Name != p.Spec.NodeName {
			continue
		}
		dir := n.Path(filepath.Join("/var/log/pods", fmt.Sprintf("%s_%s_%s", ns, pod, p.UID), container))
		files, _ := filepath.Glob(filepath.Join(dir, "*.log"))
		sort.Strings(files)
		var all []string
		for _, f := range files {
			b, _ := os.ReadFile(f)
			all = append(all, strings.Split(strings.TrimRight(string(b), "\n"), "\n")...)
		}
		if len(all) > lines {
			all = all[len(all)-lines:]
		}
		return strings.Join(all, "\n")
	}
	return "pod not on a known node"
}
