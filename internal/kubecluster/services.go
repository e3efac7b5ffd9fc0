package kubecluster

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// CoreDNSManifest deploys CoreDNS (the local image) as the cluster DNS at
// DNSServiceIP, pinned to node, with the RBAC its kubernetes plugin needs.
func CoreDNSManifest(node string) []byte {
	return []byte(fmt.Sprintf(`apiVersion: v1
kind: ServiceAccount
metadata: {name: coredns, namespace: kube-system}
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata: {name: "system:coredns"}
rules:
  - apiGroups: [""]
    resources: [endpoints, services, pods, namespaces]
    verbs: [list, watch]
  - apiGroups: [discovery.k8s.io]
    resources: [endpointslices]
    verbs: [list, watch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata: {name: "system:coredns"}
roleRef: {apiGroup: rbac.authorization.k8s.io, kind: ClusterRole, name: "system:coredns"}
subjects: [{kind: ServiceAccount, name: coredns, namespace: kube-system}]
---
apiVersion: v1
kind: ConfigMap
metadata: {name: coredns, namespace: kube-system}
data:
  Corefile: |
    .:53 {
        errors
        ready :8181
        kubernetes cluster.local in-addr.arpa ip6.arpa {
            pods insecure
            fallthrough in-addr.arpa ip6.arpa
        }
        cache 5
    }
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: coredns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  replicas: 1
  selector: {matchLabels: {k8s-app: kube-dns}}
  template:
    metadata: {labels: {k8s-app: kube-dns}}
    spec:
      serviceAccountName: coredns
      nodeName: %s
      containers:
        - name: main
          image: %s
          imagePullPolicy: Never
          args: ["-conf", "/etc/coredns/Corefile"]
          ports:
            - {containerPort: 53, protocol: UDP, name: dns}
            - {containerPort: 53, protocol: TCP, name: dns-tcp}
          readinessProbe:
            httpGet: {path: /ready, port: 8181}
            periodSeconds: 2
          volumeMounts: [{name: config, mountPath: /etc/coredns}]
      volumes: [{name: config, configMap: {name: coredns}}]
---
apiVersion: v1
kind: Service
metadata: {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}}
spec:
  selector: {k8s-app: kube-dns}
  clusterIP: %s
  ports:
    - {name: dns, port: 53, protocol: UDP, targetPort: 53}
    - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 53}
`, node, CoreDNSImage, DNSServiceIP))
}

// ServiceManifest is a ClusterIP Service name:80 -> pods labelled app=name
// on port 8080.
func ServiceManifest(name string) []byte {
	return []byte(fmt.Sprintf(`apiVersion: v1
kind: Service
metadata: {name: %s, namespace: default}
spec:
  selector: {app: %s}
  ports: [{port: 80, targetPort: 8080, protocol: TCP}]
`, name, name))
}

// WaitDeployment waits until a Deployment's replicas are all available.
func (c *Cluster) WaitDeployment(ctx context.Context, ns, name string, d time.Duration) error {
	return c.waitFor(ctx, d, "deployment "+ns+"/"+name+" available", func() (bool, error) {
		dep, err := c.client.AppsV1().Deployments(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil || dep.Spec.Replicas == nil {
			return false, nil
		}
		return dep.Status.AvailableReplicas == *dep.Spec.Replicas && dep.Status.ObservedGeneration >= dep.Generation, nil
	})
}

// ImportImage imports an image tarball into every node's containerd.
func (c *Cluster) ImportImage(ctx context.Context, tar string) error {
	for _, n := range c.Nodes {
		if _, err := n.Exec(ctx, "ctr", "--address", "/run/containerd/containerd.sock", "-n", "k8s.io", "images", "import", "--snapshotter", "native", tar); err != nil {
			return err
		}
	}
	return nil
}

// KillProcess sends sig to every process named comm in the node's pods
// (found through the node's cgroups) and returns how many it signalled.
func (n *Node) KillProcess(comm string, sig syscall.Signal) int {
	count := 0
	filepath.WalkDir(filepath.Join("/sys/fs/cgroup/pids", n.cgroupName), func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() || d.Name() != "cgroup.procs" {
			return nil
		}
		b, _ := os.ReadFile(p)
		for _, f := range strings.Fields(string(b)) {
			pid, err := strconv.Atoi(f)
			if err != nil {
				continue
			}
			if c, err := os.ReadFile(fmt.Sprintf("/proc/%d/comm", pid)); err == nil && strings.TrimSpace(string(c)) == comm {
				if syscall.Kill(pid, sig) == nil {
					count++
				}
			}
		}
		return nil
	})
	return count
}

// SubnetEnv is the node's /run/flannel/subnet.env.
func (n *Node) SubnetEnv() (string, error) {
	b, err := os.ReadFile(n.Path("/run/flannel/subnet.env"))
	return string(b), err
}

// HostLocalHolds reports whether host-local's store on the node holds ip.
func (n *Node) HostLocalHolds(ip string) bool {
	_, err := os.Stat(n.Path(filepath.Join("/var/lib/cni/networks/cbr0", ip)))
	return err == nil
}

var pingSummary = regexp.MustCompile(`(\d+) packets transmitted, (\d+) (?:packets )?received`)

// PingStats parses busybox ping's summary: sent and received.
func PingStats(out string) (sent, received int, err error) {
	m := pingSummary.FindStringSubmatch(out)
	if m == nil {
		return 0, 0, fmt.Errorf("no ping summary in %q", out)
	}
	sent, _ = strconv.Atoi(m[1])
	received, _ = strconv.Atoi(m[2])
	return sent, received, nil
}
