package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/flannelkit/flannel/internal/image"
	"github.com/flannelkit/flannel/internal/kubecluster"
	"github.com/flannelkit/flannel/internal/testenv"
)

// runKubelet is -kubelet: a real Kubernetes cluster on this machine
// (internal/kubecluster: control plane, and per node containerd, runc,
// kubelet and kube-proxy), whose pod network comes from applying
// deploy/kube-flannel.yaml with the image built here; one busybox pod per
// node, the pod table and the reachability matrix.
func runKubelet(ctx context.Context, o options, start time.Time) error {
	if o.backend != "vxlan" && o.backend != "host-gw" {
		return fmt.Errorf("-kubelet: -backend %s: the manifest's image runs vxlan or host-gw here (ipsec and wireguard need kernel modules this host lacks)", o.backend)
	}
	if !o.ipv4 {
		return errors.New("-kubelet: IPv4 is required (the cluster's Services are IPv4)")
	}
	root, err := testenv.RepoRoot()
	if err != nil {
		return fmt.Errorf("-kubelet: run from the repository: %w", err)
	}
	bin, ok := kubecluster.BinDir()
	if !ok {
		return fmt.Errorf("-kubelet: the cluster binaries are not all in %s (hack/test.sh builds them)", bin)
	}
	plugins := o.cniBin
	if plugins == "" {
		plugins = filepath.Join(root, ".cache", "bin", "cni")
	}
	dir, err := os.MkdirTemp("", "flannel-kubelet-cluster-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	goCmd := testenv.GoBinary()
	tar := filepath.Join(dir, "flanneld"+image.OCISuffix)
	const tag = "ghcr.io/flannelkit/flanneld:demo"
	res, err := image.Build(ctx, image.Options{Repo: root, Go: goCmd, CNIPlugins: plugins, Tag: tag, Out: tar, Version: "demo"})
	if err != nil {
		return err
	}
	ref := tag + "@" + res.Digest.String()
	fmt.Printf("image %s built (no daemon, no registry)\n", ref)

	ko := kubecluster.Options{Nodes: o.nodes, Dir: dir, Bin: bin, Repo: root, Go: goCmd, Images: []string{tar}}
	if o.ipv6 {
		ko.PodCIDRv6 = "fd00:10:244::/56"
	}
	c, err := kubecluster.New(ctx, ko)
	if err != nil {
		return err
	}
	defer func() {
		if err := c.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "cluster: teardown:", err)
		}
	}()
	manifest, err := kubecluster.FlannelManifest(filepath.Join(root, "deploy", "kube-flannel.yaml"), ref, string(netConf(o)))
	if err != nil {
		return err
	}
	if err := c.Apply(ctx, manifest); err != nil {
		return fmt.Errorf("kubectl apply -f deploy/kube-flannel.yaml: %w", err)
	}
	if err := c.WaitReady(ctx, 3*time.Minute); err != nil {
		return err
	}
	if err := c.WaitDaemonSet(ctx, "kube-flannel", "kube-flannel-ds", 3*time.Minute); err != nil {
		return err
	}
	var specs []*corev1.Pod
	for _, n := range c.Nodes {
		specs = append(specs, kubecluster.BusyboxPod("pod-"+n.Name, n.Name, nil))
	}
	pods, err := c.RunPods(ctx, "default", specs...)
	if err != nil {
		return err
	}
	ok = printKubelet(ctx, c, pods)
	fmt.Printf("\n%d nodes (kubelet, containerd, runc), flannel from deploy/kube-flannel.yaml, backend %s: %s in %s\n", o.nodes, o.backend,
		map[bool]string{true: "all pairs reachable", false: "SOME PAIRS FAILED"}[ok], time.Since(start).Round(time.Millisecond))
	if o.keep {
		fmt.Printf("\nStaying up until interrupted.\n  export KUBECONFIG=%s\n  (kubectl is not built here; any kubectl of 1.37 works)\n", c.Kubeconfig())
		for _, n := range c.Nodes {
			fmt.Printf("  nsenter --target %d --mount --net sh    # node %s (its containerd: ctr --address /run/containerd/containerd.sock -n k8s.io ...)\n", n.HolderPID(), n.Name)
		}
		fmt.Println("If this process is killed, `go run ./examples/cluster -clean` removes what it left.")
		<-ctx.Done()
	}
	if !ok {
		return errors.New("not every pod pair could reach each other")
	}
	return nil
}

// printKubelet prints the node and pod table and the ICMP+TCP matrix.
func printKubelet(ctx context.Context, c *kubecluster.Cluster, pods []*corev1.Pod) bool {
	tw := tabwriter.NewWriter(os.Stdout, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tPODCIDRS\tFLANNEL_SUBNET\tPOD\tPOD IPS")
	for i, n := range c.Nodes {
		node, err := c.Client().CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
		cidrs := ""
		if err == nil {
			cidrs = strings.Join(node.Spec.PodCIDRs, ",")
		}
		env, _ := n.SubnetEnv()
		subnet := ""
		for _, l := range strings.Split(env, "\n") {
			if v, ok := strings.CutPrefix(l, "FLANNEL_SUBNET="); ok {
				subnet = v
			}
		}
		var ips []string
		for _, ip := range pods[i].Status.PodIPs {
			ips = append(ips, ip.IP)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", n.Name, cidrs, subnet, pods[i].Name, strings.Join(ips, ","))
	}
	tw.Flush()
	fmt.Println()
	names := make([]string, len(c.Nodes))
	res := make([][]error, len(pods))
	for i, from := range pods {
		names[i] = c.Nodes[i].Name
		res[i] = make([]error, len(pods))
		for j, to := range pods {
			if i == j {
				continue
			}
			var errs []error
			for _, ip := range to.Status.PodIPs {
				errs = append(errs, c.Reach(ctx, "default", from.Name, ip.IP, 8080, to.Name))
			}
			res[i][j] = errors.Join(errs...)
		}
	}
	return printMatrix(os.Stdout, names, res)
}

// cleanKubelet is -clean: remove what a killed -kubelet run (or test) left.
func cleanKubelet() error {
	if err := kubecluster.Sweep(); err != nil {
		return err
	}
	fmt.Println("removed what killed cluster runs left (processes, cgroups, namespaces; sysctls restored)")
	return nil
}
