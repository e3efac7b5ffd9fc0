// Package kubecluster runs a real Kubernetes cluster on one machine with no
// Docker: etcd and kube-apiserver (internal/kubetest) with the
// kube-controller-manager (--allocate-node-cidrs) and kube-scheduler on
// the host, and nodes that are netlab network namespaces, each with its
// own mount namespace in which containerd, runc, the kubelet and
// kube-proxy run with the node's own /var/lib/kubelet, /run/containerd,
// /etc/cni/net.d, /opt/cni/bin, /var/lib/cni and /run/flannel. Images are
// imported into each node's containerd from tarballs; nothing is pulled.
//
// The node has no CNI until something installs it (our manifest's init
// containers do), so nodes stay NotReady until then, as on a real
// cluster.
//
// It needs root, the binaries hack/test.sh builds (kube-apiserver,
// kubelet, kube-controller-manager, kube-scheduler, kube-proxy, coredns
// in .cache/bin), Debian's containerd and runc, nsenter and unshare. The
// kubelet sets host-wide sysctls (vm.overcommit_memory, kernel.panic,
// kernel.panic_on_oops): their values are recorded first and restored by
// Close, or by the next New after a killed run. Only one cluster runs at a
// time (the host joins the lab's underlay to reach the nodes).
package kubecluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/flannelkit/flannel/internal/image"
	"github.com/flannelkit/flannel/internal/kubetest"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/testenv"
)

// DNSServiceIP is the cluster DNS Service's ClusterIP.
const DNSServiceIP = "10.96.0.10"

// Options describe a cluster.
type Options struct {
	// Nodes is the number of nodes (required, 1..20).
	Nodes int
	// Dir holds every file of the cluster (required).
	Dir string
	// Bin holds kube-apiserver, kubelet, kube-controller-manager,
	// kube-scheduler, kube-proxy and coredns (required).
	Bin string
	// Repo is this repository's root and Go the go command, to build the
	// pause binary (required).
	Repo, Go string
	// PodCIDR and PodCIDRv6 are --cluster-cidr (default 10.244.0.0/16;
	// PodCIDRv6 empty is IPv4 only).
	PodCIDR, PodCIDRv6 string
	// Images are docker-archive tarballs imported into every node.
	Images []string
}

// Cluster is a running cluster.
type Cluster struct {
	Lab   *netlab.Lab
	API   *kubetest.Server
	Admin *rest.Config
	Nodes []*Node

	opts      Options
	client    kubernetes.Interface
	procs     []*testenv.Proc
	images    []string
	sysctls   string
	kubeconf  string
	hostIface string
}

// HostIP is the host's address on the underlay, where the apiserver
// listens.
func HostIP() netip.Addr { return netip.MustParseAddr("172.30.0.250") }

// New starts the control plane and the nodes and waits until every node is
// registered. On failure everything is torn down again.
func New(ctx context.Context, o Options) (c *Cluster, err error) {
	if o.Nodes < 1 || o.Nodes > 20 || o.Dir == "" || o.Bin == "" || o.Repo == "" || o.Go == "" {
		return nil, errors.New("kubecluster: Nodes (1..20), Dir, Bin, Repo and Go are required")
	}
	if o.PodCIDR == "" {
		o.PodCIDR = "10.244.0.0/16"
	}
	c = &Cluster{opts: o}
	defer func() {
		if err != nil {
			err = errors.Join(err, c.Close())
		}
	}()
	if err := Sweep(); err != nil {
		return c, fmt.Errorf("kubecluster: sweep what killed runs left: %w", err)
	}
	if err := c.saveSysctls(); err != nil {
		return c, err
	}
	if c.Lab, err = netlab.New(netlab.Options{Nodes: o.Nodes, IPv4: true, IPv6: o.PodCIDRv6 != ""}); err != nil {
		return c, err
	}
	if err := c.recordOwner(); err != nil {
		return c, err
	}
	if c.hostIface, err = c.Lab.AttachHost(HostIP()); err != nil {
		return c, err
	}
	if err := c.buildImages(); err != nil {
		return c, err
	}
	c.API, err = kubetest.New(kubetest.Options{
		Binary:  filepath.Join(o.Bin, "kube-apiserver"),
		Dir:     filepath.Join(o.Dir, "apiserver"),
		Address: net.IP(HostIP().AsSlice()),
		CertIPs: []net.IP{net.IPv4(10, 96, 0, 1)}, // the kubernetes Service
		ExtraArgs: []string{
			"--allow-privileged=true",
			"--endpoint-reconciler-type=lease",
			"--kubelet-preferred-address-types=InternalIP,Hostname",
		},
	})
	if err != nil {
		return c, err
	}
	c.Admin = c.API.AdminConfig()
	if c.client, err = kubernetes.NewForConfig(c.Admin); err != nil {
		return c, err
	}
	c.kubeconf = filepath.Join(o.Dir, "admin.kubeconfig")
	if err := writeFile(c.kubeconf, kubeconfig(c.API.URL, c.API.CAFile, c.API.AdminToken()), 0o600); err != nil {
		return c, err
	}
	if err := c.startControlPlane(); err != nil {
		return c, err
	}
	for i, ln := range c.Lab.Nodes {
		n := &Node{Name: ln.Name, Lab: ln, Dir: filepath.Join(o.Dir, ln.Name), c: c, cgroupName: "kc-" + c.Lab.Name + "-" + ln.Name, procs: map[string]*testenv.Proc{}}
		c.Nodes = append(c.Nodes, n)
		if err := n.start(ctx); err != nil {
			return c, fmt.Errorf("node %d: %w", i, err)
		}
	}
	for _, n := range c.Nodes {
		if err := c.waitFor(ctx, 90*time.Second, "node "+n.Name+" registered", func() (bool, error) {
			for _, p := range c.procs {
				if p.Exited() {
					return false, fmt.Errorf("%s exited: %s", p.Name, p.Tail(5))
				}
			}
			_, err := c.client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			return err == nil, nil
		}); err != nil {
			return c, fmt.Errorf("%w\nkubelet log:\n%s", err, n.procs["kubelet"].Tail(30))
		}
	}
	return c, nil
}

// Client is an admin clientset.
func (c *Cluster) Client() kubernetes.Interface { return c.client }

// Kubeconfig is an admin kubeconfig file.
func (c *Cluster) Kubeconfig() string { return c.kubeconf }

func (c *Cluster) startControlPlane() error {
	o := c.opts
	cidr := joinNonEmpty(o.PodCIDR, o.PodCIDRv6)
	masks := []string{"--node-cidr-mask-size=24"}
	if o.PodCIDRv6 != "" {
		masks = []string{"--node-cidr-mask-size-ipv4=24", "--node-cidr-mask-size-ipv6=64"}
	}
	kcm := exec.Command(filepath.Join(o.Bin, "kube-controller-manager"), append(masks,
		"--kubeconfig="+c.kubeconf,
		"--controllers=*",
		"--allocate-node-cidrs=true",
		"--cluster-cidr="+cidr,
		"--service-cluster-ip-range=10.96.0.0/24",
		"--root-ca-file="+c.API.CAFile,
		"--service-account-private-key-file="+c.API.SAKeyFile,
		"--use-service-account-credentials=false",
		"--leader-elect=false",
		"--bind-address=127.0.0.1",
		"--secure-port=0",
		"--configure-cloud-routes=false",
		"--node-monitor-period=2s",
		"--node-monitor-grace-period=20s",
		"--v=1",
	)...)
	p, err := testenv.StartProc("kube-controller-manager", filepath.Join(o.Dir, "kube-controller-manager.log"), kcm, true)
	if err != nil {
		return err
	}
	c.procs = append(c.procs, p)
	sched := exec.Command(filepath.Join(o.Bin, "kube-scheduler"),
		"--kubeconfig="+c.kubeconf, "--authentication-kubeconfig="+c.kubeconf, "--authorization-kubeconfig="+c.kubeconf,
		"--leader-elect=false", "--bind-address=127.0.0.1", "--secure-port=0", "--v=1")
	p, err = testenv.StartProc("kube-scheduler", filepath.Join(o.Dir, "kube-scheduler.log"), sched, true)
	if err != nil {
		return err
	}
	c.procs = append(c.procs, p)
	return nil
}

// buildImages builds the pause, busybox and CoreDNS images.
func (c *Cluster) buildImages() error {
	dir := filepath.Join(c.opts.Dir, "images")
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	pause := filepath.Join(dir, "pause")
	build := exec.Command(c.opts.Go, "build", "-trimpath", "-ldflags=-s -w", "-o", pause, "./internal/kubecluster/pause")
	build.Dir = c.opts.Repo
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		return fmt.Errorf("build pause: %w\n%s", err, out)
	}
	bb := "/bin/busybox"
	out, err := exec.Command(bb, "--list-full").Output()
	if err != nil {
		return fmt.Errorf("busybox --list-full: %w (Debian package busybox-static)", err)
	}
	links := map[string]string{}
	for _, l := range strings.Fields(string(out)) {
		if l != "bin/busybox" {
			links["/"+l] = "/bin/busybox"
		}
	}
	for _, im := range []struct {
		s   image.Simple
		out string
	}{
		{image.Simple{Tag: PauseImage, Files: map[string]string{"/pause": pause}, Entrypoint: []string{"/pause"}}, "pause.tar"},
		{image.Simple{Tag: BusyboxImage, Files: map[string]string{"/bin/busybox": bb}, Links: links, Entrypoint: []string{"/bin/sh"}}, "busybox.tar"},
		{image.Simple{Tag: CoreDNSImage, Files: map[string]string{"/coredns": filepath.Join(c.opts.Bin, "coredns")}, Entrypoint: []string{"/coredns"}}, "coredns.tar"},
	} {
		p := filepath.Join(dir, im.out)
		if _, err := image.BuildSimple(im.s, p); err != nil {
			return err
		}
		c.images = append(c.images, p)
	}
	c.images = append(c.images, c.opts.Images...)
	return nil
}

// Log is the tail of a control-plane process's log ("kube-controller-manager",
// "kube-scheduler").
func (c *Cluster) Log(name string, lines int) string {
	for _, p := range c.procs {
		if p.Name == name {
			return p.Tail(lines)
		}
	}
	return ""
}

// Close tears everything down and restores the sysctls. It is safe to
// call more than once.
func (c *Cluster) Close() error {
	for _, n := range c.Nodes {
		n.stop()
	}
	c.Nodes = nil
	for _, p := range c.procs {
		p.Stop(syscall.SIGTERM, 10*time.Second)
	}
	c.procs = nil
	var errs []error
	if c.API != nil {
		errs = append(errs, c.API.Close())
		c.API = nil
	}
	if c.Lab != nil {
		errs = append(errs, c.Lab.Close())
		c.forgetOwner()
		c.Lab = nil
	}
	errs = append(errs, c.restoreSysctls())
	return errors.Join(errs...)
}

// waitFor polls cond every 200 ms until it holds, fails, or d passes.
func (c *Cluster) waitFor(ctx context.Context, d time.Duration, what string, cond func() (bool, error)) error {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	for {
		ok, err := cond()
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("%s: not after %v", what, d)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// WaitReady waits until every node is Ready.
func (c *Cluster) WaitReady(ctx context.Context, d time.Duration) error {
	for _, n := range c.Nodes {
		err := c.waitFor(ctx, d, "node "+n.Name+" Ready", func() (bool, error) {
			node, err := c.client.CoreV1().Nodes().Get(ctx, n.Name, metav1.GetOptions{})
			if err != nil {
				return false, nil
			}
			for _, cond := range node.Status.Conditions {
				if cond.Type == corev1.NodeReady {
					return cond.Status == corev1.ConditionTrue, nil
				}
			}
			return false, nil
		})
		if err != nil {
			return fmt.Errorf("%w\nkubelet log:\n%s", err, n.Log("kubelet", 20))
		}
	}
	return nil
}
