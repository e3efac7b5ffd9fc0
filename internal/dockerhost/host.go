package dockerhost

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/testenv"
)

// Host is one Docker host: a netlab node namespace, a mount namespace held
// by a placeholder process in which the host's own directories are bound
// over the paths flanneld and dockerd use without a flag (boundDirs), and
// a cgroup that every process of the host (flanneld, dockerd, its
// containerd and shims, the containers below it) belongs to.
type Host struct {
	// Name is the netlab node's name.
	Name string
	// Lab is the host's network namespace.
	Lab *netlab.Node
	// Root holds the host's files: dockerd's data-root, exec-root,
	// pidfile, socket, the bound directories and the logs.
	Root string

	c        *Cluster
	cgroup   string
	joins    []string // cgroup.procs files of the host's cgroup
	holder   *exec.Cmd
	flanneld *testenv.Proc
	dockerd  *testenv.Proc
}

// boundDirs are the fixed paths that are per host: /run/flannel
// (subnet.env and the docker-opts file, at the units' paths), and what
// dockerd 20.10 and its containerd write without a flag (/etc/docker's
// key.json, /run/docker/plugins, containerd's shim sockets in
// /run/containerd/s).
func boundDirs() []string {
	return []string{"/run/flannel", "/etc/docker", "/run/docker", "/run/containerd"}
}

// Path is the host path of a path as the Docker host sees it.
func (h *Host) Path(p string) string {
	for _, d := range boundDirs() {
		if p == d || strings.HasPrefix(p, d+"/") {
			return filepath.Join(h.Root, "bind", p)
		}
	}
	return p
}

// Socket is the host's Docker API socket.
func (h *Host) Socket() string { return filepath.Join(h.Root, "docker.sock") }

// startHolder creates the host's cgroup and mount namespace.
func (h *Host) startHolder() error {
	var err error
	if h.joins, err = makeCgroup(h.cgroup); err != nil {
		return fmt.Errorf("host %s: cgroup: %w", h.Name, err)
	}
	var b strings.Builder
	b.WriteString("set -e\n")
	for _, d := range boundDirs() {
		if err := os.MkdirAll(h.Path(d), 0o755); err != nil {
			return err
		}
		fmt.Fprintf(&b, "mkdir -p %s\nmount --bind %s %s\n", d, h.Path(d), d)
	}
	ready := filepath.Join(h.Root, "ready")
	fmt.Fprintf(&b, "touch %s\nexec sleep 2147483647\n", ready)
	cmd := exec.Command("nsenter", "--net=/run/netns/"+h.Lab.NSName, "--", "unshare", "--mount", "--propagation", "private", "--",
		"/bin/sh", "-c", h.joinScript()+b.String())
	p, err := testenv.StartProc("holder", filepath.Join(h.Root, "holder.log"), cmd, false)
	if err != nil {
		return err
	}
	h.holder = p.Cmd
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(ready); err == nil {
			// As on a fresh host, IPv4 forwarding is off until dockerd
			// turns it on, and sets FORWARD's policy to DROP then.
			_, err := h.Exec(context.Background(), "/bin/sh", "-c", "echo 0 > /proc/sys/net/ipv4/ip_forward")
			return err
		}
		if p.Exited() || time.Now().After(deadline) {
			return fmt.Errorf("host %s: mount namespace not set up: %s", h.Name, p.Tail(10))
		}
	}
}

// joinScript is shell that moves the shell into the host's cgroup.
func (h *Host) joinScript() string {
	return "for f in " + strings.Join(h.joins, " ") + "; do echo $$ > \"$f\"; done\n"
}

// command makes a command that runs on the host: in its network and mount
// namespaces and its cgroup, with the clean environment systemd gives a
// service (only PATH), not the caller's.
func (h *Host) command(ctx context.Context, name string, args ...string) *exec.Cmd {
	a := append([]string{"--target", strconv.Itoa(h.holder.Process.Pid), "--mount", "--net", "--",
		"/bin/sh", "-c", h.joinScript() + `exec "$@"`, "sh", name}, args...)
	cmd := exec.CommandContext(ctx, "nsenter", a...)
	cmd.Env = []string{servicePath}
	return cmd
}

// servicePath is systemd's default PATH for services.
const servicePath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// Exec runs a command on the host and returns its combined output.
func (h *Host) Exec(ctx context.Context, name string, args ...string) (string, error) {
	out, err := h.command(ctx, name, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("host %s: %s %s: %w: %s", h.Name, name, strings.Join(args, " "), err, out)
	}
	return string(out), nil
}

// StartFlanneld runs flanneld.service on the host: ExecStart with the
// unit's Environment= and, as the operator's /etc/default/flanneld,
// FLANNELD_ETCD_ENDPOINTS of the lab's etcd, and (Type=notify) a
// NOTIFY_SOCKET whose READY=1 it waits for; then ExecStartPost
// (docker-opts), as systemd does before it counts the unit started. It
// returns when ExecStartPost has succeeded.
func (h *Host) StartFlanneld(ctx context.Context) error {
	u := h.c.units
	ctx, cancel := context.WithTimeout(ctx, 120*time.Second) // TimeoutStartSec
	defer cancel()
	cmd := h.command(context.Background(), h.c.opts.Flanneld, u.FlanneldArgs...)
	cmd.Env = append(append(cmd.Env, u.FlanneldEnv...), "FLANNELD_ETCD_ENDPOINTS="+h.c.EtcdEndpoint())
	var ready <-chan error
	if u.Notify {
		sock, c, err := listenNotify()
		if err != nil {
			return fmt.Errorf("host %s: %w", h.Name, err)
		}
		defer c.close()
		cmd.Env = append(cmd.Env, "NOTIFY_SOCKET="+sock)
		ready = c.ready
	}
	p, err := testenv.StartProc("flanneld", filepath.Join(h.Root, "flanneld.log"), cmd, false)
	if err != nil {
		return err
	}
	h.flanneld = p
	if ready != nil {
		select {
		case err := <-ready:
			if err != nil {
				return fmt.Errorf("host %s: flanneld notify socket: %w", h.Name, err)
			}
		case <-p.Done():
			return fmt.Errorf("host %s: flanneld exited before it was ready: %s", h.Name, p.Tail(20))
		case <-ctx.Done():
			return fmt.Errorf("host %s: flanneld sent no READY=1 within TimeoutStartSec: %s", h.Name, p.Tail(20))
		}
	}
	out, err := h.command(ctx, h.postArgs()[0], h.postArgs()[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("host %s: flanneld ExecStartPost: %w: %s\nflanneld log:\n%s", h.Name, err, out, p.Tail(20))
	}
	return nil
}

// postArgs is ExecStartPost with the harness's flanneld binary.
func (h *Host) postArgs() []string {
	args := append([]string(nil), h.c.units.PostArgs...)
	if args[0] == h.c.units.FlanneldBin {
		args[0] = h.c.opts.Flanneld
	}
	return args
}

// StopFlanneld signals flanneld and waits for it to exit (SIGKILL after
// 20 s).
func (h *Host) StopFlanneld(sig syscall.Signal) {
	h.flanneld.Stop(sig, 20*time.Second)
	h.flanneld = nil
}

// DockerOpts runs ExecStartPost's docker-opts command alone, as an
// operator would by hand, and returns its output.
func (h *Host) DockerOpts(ctx context.Context) (string, error) {
	f := h.postArgs()
	return h.Exec(ctx, f[0], f[1:]...)
}

// SubnetEnv reads the host's /run/flannel/subnet.env.
func (h *Host) SubnetEnv() (flannel.SubnetEnv, error) {
	return flannel.ReadCompleteSubnetEnv(h.Path("/run/flannel/subnet.env"))
}

// DockerdArgs are the arguments StartDocker runs dockerd with: the
// drop-in's ExecStart with its EnvironmentFile expanded, then the host's
// own roots, socket and cgroup. It fails as systemd does when the
// environment file is missing.
func (h *Host) DockerdArgs() ([]string, error) {
	envFile := h.c.units.DockerEnvFile
	env, err := readEnvFile(h.Path(envFile))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("host %s: docker.service: EnvironmentFile %s: %w (systemd does not start dockerd: "+
			"flanneld.service's docker-opts step has not run)", h.Name, envFile, err)
	}
	if err != nil {
		return nil, err
	}
	return dockerdArgs(h.c.units.DockerdArgs, env, h.Socket(),
		"--data-root="+filepath.Join(h.Root, "data"),
		"--exec-root="+filepath.Join(h.Root, "exec"),
		"--pidfile="+filepath.Join(h.Root, "docker.pid"),
		"--config-file="+filepath.Join(h.Root, "daemon.json"),
		"--cgroup-parent=/"+h.cgroup+"/docker")
}

// StartDocker starts the host's dockerd (see DockerdArgs), waits for its
// API and imports the test image.
func (h *Host) StartDocker(ctx context.Context) error {
	args, err := h.DockerdArgs()
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(h.Root, "daemon.json"), []byte("{}\n"), 0o644); err != nil {
		return err
	}
	p, err := testenv.StartProc("dockerd", filepath.Join(h.Root, "dockerd.log"), h.command(context.Background(), h.c.dockerd, args...), false)
	if err != nil {
		return err
	}
	h.dockerd = p
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	for {
		if _, err := h.Docker(ctx, "version"); err == nil {
			break
		}
		if p.Exited() {
			return fmt.Errorf("host %s: dockerd exited: %s", h.Name, p.Tail(20))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("host %s: dockerd API not up: %s", h.Name, p.Tail(20))
		case <-time.After(100 * time.Millisecond):
		}
	}
	if _, err := h.Docker(ctx, "image", "inspect", Image); err == nil {
		return nil
	}
	return h.c.importImage(ctx, h)
}

// StopDocker signals dockerd and waits for it (and so its containerd) to
// exit.
func (h *Host) StopDocker(sig syscall.Signal) {
	h.dockerd.Stop(sig, 20*time.Second)
	h.dockerd = nil
}

// Docker runs the docker CLI against the host's dockerd.
func (h *Host) Docker(ctx context.Context, args ...string) (string, error) {
	out, err := h.c.cli(ctx, h, args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("host %s: docker %s: %w: %s", h.Name, strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out)), nil
}

// Run starts a detached container from Image (with docker-init, so that
// it stops at once) and returns its address on the bridge.
func (h *Host) Run(ctx context.Context, name string, cmd ...string) (netip.Addr, error) {
	if _, err := h.Docker(ctx, append([]string{"run", "-d", "--init", "--name", name, Image}, cmd...)...); err != nil {
		return netip.Addr{}, err
	}
	ip, err := h.Docker(ctx, "inspect", "-f", "{{.NetworkSettings.IPAddress}}", name)
	if err != nil {
		return netip.Addr{}, err
	}
	return netip.ParseAddr(ip)
}

// Log is the tail of a log of the host: "flanneld", "dockerd", "holder".
func (h *Host) Log(name string, lines int) string {
	return testenv.TailFile(filepath.Join(h.Root, name+".log"), lines)
}

// close removes the containers, stops dockerd and flanneld, kills what is
// left in the host's cgroup and ends its mount namespace.
func (h *Host) close() error {
	if h.dockerd != nil && !h.dockerd.Exited() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		if ids, err := h.Docker(ctx, "ps", "-aq"); err == nil && ids != "" {
			_, _ = h.Docker(ctx, append([]string{"rm", "-f"}, strings.Fields(ids)...)...)
		}
		cancel()
	}
	h.StopDocker(syscall.SIGTERM)
	h.StopFlanneld(syscall.SIGTERM)
	err := killCgroup(h.cgroup)
	if h.holder != nil {
		_ = h.holder.Process.Kill()
	}
	return err
}
