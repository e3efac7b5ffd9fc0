package kubecluster

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/testenv"
)

// Node is one Kubernetes node: a netlab node namespace, a mount namespace
// held by a placeholder process in which the node's directories are bound
// over the standard paths, and containerd, the kubelet and kube-proxy
// running in both.
type Node struct {
	// Name is the Node object's name (the netlab node's name).
	Name string
	// Lab is the node's network namespace.
	Lab *netlab.Node
	// Dir holds the node's files.
	Dir string

	c          *Cluster
	holder     *exec.Cmd
	cgroupName string
	procs      map[string]*testenv.Proc
}

// boundDirs are the paths that are per node, as a kubelet's runtime sees
// them; each is bound from Dir/<path with / as _>.
func boundDirs() []string {
	// /run/netns too: containerd pins each pod's network namespace there,
	// and a node's pins must go with its mount namespace, not outlive it on
	// the host.
	return []string{"/var/lib/kubelet", "/var/log/pods", "/var/log/containers", "/run/containerd", "/var/lib/containerd",
		"/etc/cni/net.d", "/opt/cni/bin", "/var/lib/cni", "/run/flannel", "/etc/kubernetes", "/run/netns"}
}

// Path is the host path of a node path under one of the bound directories.
func (n *Node) Path(p string) string {
	for _, d := range boundDirs() {
		if p == d || strings.HasPrefix(p, d+"/") {
			return filepath.Join(n.Dir, "root", p)
		}
	}
	return p
}

// setupScript runs in the node's new mount namespace: a sysfs of the node's
// network namespace, the cgroup hierarchies again on it (the host's list),
// the node's directories, then the placeholder that holds the namespace.
func (n *Node) setupScript() (string, error) {
	var b strings.Builder
	b.WriteString("set -e\nmount -t sysfs sysfs /sys\nmount -t tmpfs -o mode=755 tmpfs /sys/fs/cgroup\n")
	f, err := os.Open("/proc/self/mounts")
	if err != nil {
		return "", err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fl := strings.Fields(sc.Text())
		if len(fl) < 4 || !strings.HasPrefix(fl[1], "/sys/fs/cgroup/") {
			continue
		}
		switch fl[2] {
		case "cgroup":
			var opts []string
			for _, o := range strings.Split(fl[3], ",") {
				if o != "rw" && o != "ro" && o != "relatime" && o != "nosuid" && o != "nodev" && o != "noexec" {
					opts = append(opts, o)
				}
			}
			fmt.Fprintf(&b, "mkdir -p %s\nmount -t cgroup -o %s cgroup %s\n", fl[1], strings.Join(opts, ","), fl[1])
		case "cgroup2":
			fmt.Fprintf(&b, "mkdir -p %s\nmount -t cgroup2 cgroup2 %s\n", fl[1], fl[1])
		}
	}
	entries, _ := os.ReadDir("/sys/fs/cgroup")
	for _, e := range entries {
		if e.Type()&os.ModeSymlink != 0 {
			t, _ := os.Readlink(filepath.Join("/sys/fs/cgroup", e.Name()))
			fmt.Fprintf(&b, "ln -s %s /sys/fs/cgroup/%s\n", t, e.Name())
		}
	}
	for _, d := range boundDirs() {
		fmt.Fprintf(&b, "mkdir -p %s\nmount --bind %s %s\n", d, n.Path(d), d)
	}
	// The kubelet wants /var/lib/kubelet shared for mount propagation.
	b.WriteString("mount --make-rshared /var/lib/kubelet\n")
	fmt.Fprintf(&b, "touch %s\nexec sleep 2147483647\n", filepath.Join(n.Dir, "ready"))
	return b.String(), sc.Err()
}

// cgroupRoot creates the node's cgroup in every v1 hierarchy (the
// kubelet's cgroupRoot), with cpuset's cpus and mems copied in.
func (n *Node) cgroupRoot() error {
	entries, err := os.ReadDir("/sys/fs/cgroup")
	if err != nil {
		return err
	}
	for _, e := range entries {
		if !e.IsDir() || e.Name() == "unified" {
			continue
		}
		d := filepath.Join("/sys/fs/cgroup", e.Name(), n.cgroupName)
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("cgroup %s: %w", d, err)
		}
		if e.Name() == "cpuset" {
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				v, err := os.ReadFile(filepath.Join("/sys/fs/cgroup/cpuset", f))
				if err == nil {
					err = os.WriteFile(filepath.Join(d, f), v, 0o644)
				}
				if err != nil {
					return fmt.Errorf("cgroup %s: %w", d, err)
				}
			}
		}
	}
	return nil
}

// removeCgroups kills what is left in the node's cgroups and removes them,
// deepest first.
func (n *Node) removeCgroups() {
	entries, _ := os.ReadDir("/sys/fs/cgroup")
	for _, e := range entries {
		root := filepath.Join("/sys/fs/cgroup", e.Name(), n.cgroupName)
		var dirs []string
		filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
			if err == nil && d.IsDir() {
				dirs = append(dirs, p)
			}
			return nil
		})
		for i := len(dirs) - 1; i >= 0; i-- {
			if b, err := os.ReadFile(filepath.Join(dirs[i], "cgroup.procs")); err == nil {
				for _, f := range strings.Fields(string(b)) {
					if pid, err := strconv.Atoi(f); err == nil {
						syscall.Kill(pid, syscall.SIGKILL)
					}
				}
			}
		}
		for i := len(dirs) - 1; i >= 0; i-- {
			for range 50 {
				if err := os.Remove(dirs[i]); err == nil || errors.Is(err, os.ErrNotExist) {
					break
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
	}
}

// startHolder creates the node's mount namespace.
func (n *Node) startHolder() error {
	for _, d := range boundDirs() {
		if err := os.MkdirAll(n.Path(d), 0o755); err != nil {
			return err
		}
	}
	script, err := n.setupScript()
	if err != nil {
		return err
	}
	cmd := exec.Command("nsenter", "--net=/run/netns/"+n.Lab.NSName, "--", "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script)
	log, err := os.Create(filepath.Join(n.Dir, "holder.log"))
	if err != nil {
		return err
	}
	cmd.Stdout, cmd.Stderr = log, log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		log.Close()
		return err
	}
	n.holder = cmd
	go func() { cmd.Wait(); log.Close() }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(filepath.Join(n.Dir, "ready")); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			b, _ := os.ReadFile(filepath.Join(n.Dir, "holder.log"))
			return fmt.Errorf("node %s: mount namespace not set up: %s", n.Name, b)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// holderPID is the pid of the placeholder process (the sleep the setup
// script execs into, in the node's namespaces).
func (n *Node) holderPID() int { return n.holder.Process.Pid }

// HolderPID is the pid of the process holding the node's mount namespace
// (for nsenter --target when debugging).
func (n *Node) HolderPID() int { return n.holderPID() }

// command makes a command that runs in the node's network and mount
// namespaces.
func (n *Node) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	a := append([]string{"--target", strconv.Itoa(n.holderPID()), "--mount", "--net", "--", name}, args...)
	cmd := exec.CommandContext(ctx, "nsenter", a...)
	return cmd
}

// Exec runs a command on the node and returns its combined output.
func (n *Node) Exec(ctx context.Context, name string, args ...string) ([]byte, error) {
	out, err := n.command(ctx, name, args...).CombinedOutput()
	if err != nil {
		return out, fmt.Errorf("node %s: %s %s: %w: %s", n.Name, name, strings.Join(args, " "), err, out)
	}
	return out, nil
}

// start brings a node up: namespace, cgroups, containerd with the images,
// kubelet, kube-proxy.
func (n *Node) start(ctx context.Context) error {
	if err := os.MkdirAll(n.Dir, 0o755); err != nil {
		return err
	}
	if err := n.cgroupRoot(); err != nil {
		return err
	}
	if err := n.startHolder(); err != nil {
		return err
	}
	c := n.c
	files := map[string]string{
		filepath.Join(n.Dir, "containerd.toml"): n.containerdConfig(),
		filepath.Join(n.Dir, "kubelet.yaml"):    n.kubeletConfig(),
		filepath.Join(n.Dir, "kube-proxy.yaml"): n.kubeProxyConfig(joinNonEmpty(c.opts.PodCIDR, c.opts.PodCIDRv6)),
		filepath.Join(n.Dir, "kubeconfig"):      kubeconfig(c.API.URL, c.API.CAFile, c.API.AdminToken()),
		filepath.Join(n.Dir, "resolv.conf"):     "nameserver 127.0.0.1\n",
		n.Path("/etc/kubernetes/node-name"):     n.Name + "\n",
	}
	for p, content := range files {
		if err := writeFile(p, content, 0o600); err != nil {
			return err
		}
	}
	if err := n.StartContainerd(ctx); err != nil {
		return err
	}
	for _, im := range c.images {
		if _, err := n.Exec(ctx, "ctr", "--address", "/run/containerd/containerd.sock", "-n", "k8s.io", "images", "import", "--snapshotter", "native", im); err != nil {
			return err
		}
	}
	if err := n.StartKubelet(); err != nil {
		return err
	}
	return n.StartProxy()
}

// StartContainerd starts the node's containerd and waits for its socket.
func (n *Node) StartContainerd(ctx context.Context) error {
	p, err := testenv.StartProc("containerd", filepath.Join(n.Dir, "containerd.log"), n.command(context.Background(), "containerd", "--config", filepath.Join(n.Dir, "containerd.toml")), true)
	if err != nil {
		return err
	}
	n.procs["containerd"] = p
	return n.c.waitFor(ctx, 30*time.Second, "containerd on "+n.Name, func() (bool, error) {
		if p.Exited() {
			return false, fmt.Errorf("containerd exited: %s", p.Tail(20))
		}
		_, err := n.command(ctx, "ctr", "--address", "/run/containerd/containerd.sock", "version").CombinedOutput()
		return err == nil, nil
	})
}

// StartKubelet starts the node's kubelet.
func (n *Node) StartKubelet() error {
	ips := n.Lab.IP.String()
	if n.Lab.IPv6.IsValid() {
		ips += "," + n.Lab.IPv6.String()
	}
	p, err := testenv.StartProc("kubelet", filepath.Join(n.Dir, "kubelet.log"), n.command(context.Background(), filepath.Join(n.c.opts.Bin, "kubelet"),
		"--config="+filepath.Join(n.Dir, "kubelet.yaml"),
		"--kubeconfig="+filepath.Join(n.Dir, "kubeconfig"),
		"--hostname-override="+n.Name,
		"--node-ip="+ips,
		"--root-dir=/var/lib/kubelet",
		"--v=1",
	), true)
	if err != nil {
		return err
	}
	n.procs["kubelet"] = p
	return nil
}

// StartProxy starts the node's kube-proxy.
func (n *Node) StartProxy() error {
	p, err := testenv.StartProc("kube-proxy", filepath.Join(n.Dir, "kube-proxy.log"), n.command(context.Background(), filepath.Join(n.c.opts.Bin, "kube-proxy"),
		"--config="+filepath.Join(n.Dir, "kube-proxy.yaml"), "--v=1"), true)
	if err != nil {
		return err
	}
	n.procs["kube-proxy"] = p
	return nil
}

// Kill stops one of the node's daemons ("containerd", "kubelet",
// "kube-proxy") with sig; pods keep running (their shims are not
// containerd's children).
func (n *Node) Kill(name string, sig syscall.Signal) { n.procs[name].Stop(sig, 10*time.Second) }

// Log is the tail of one of the node's daemon logs.
func (n *Node) Log(name string, lines int) string {
	if p := n.procs[name]; p != nil {
		return p.Tail(lines)
	}
	return ""
}

// stop kills everything in the node's mount namespace (daemons, shims,
// containers) and removes its cgroups.
func (n *Node) stop() {
	for _, name := range []string{"kube-proxy", "kubelet", "containerd"} {
		n.procs[name].Stop(syscall.SIGTERM, 10*time.Second)
	}
	if n.holder != nil && n.holder.Process != nil {
		killNamespace(n.holderPID())
		n.holder.Process.Kill()
	}
	n.removeCgroups()
}

// killNamespace kills every process whose mount namespace is pid's.
func killNamespace(pid int) {
	want, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", pid))
	if err != nil {
		return
	}
	for range 3 {
		entries, _ := os.ReadDir("/proc")
		n := 0
		for _, e := range entries {
			var p int
			if _, err := fmt.Sscan(e.Name(), &p); err != nil || p == pid || p == os.Getpid() {
				continue
			}
			if ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", p)); err == nil && ns == want {
				syscall.Kill(p, syscall.SIGKILL)
				n++
			}
		}
		if n == 0 {
			return
		}
		time.Sleep(200 * time.Millisecond)
	}
}
