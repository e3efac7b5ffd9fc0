// Package cnilab is the container runtime's side of CNI for netlab nodes:
// it drives real CNI plugins through libcni (what containerd uses) with a
// conflist, as a kubelet's runtime does for every pod. Each Node runs its
// plugins inside the node's network namespace and in a private mount
// namespace where the node's own directories are bound over /run/flannel
// and /var/lib/cni, so several nodes on one machine each see the standard
// paths (subnet.env, the flannel plugin's data dir, host-local's store)
// without sharing them. The conflist is used as given: by default upstream
// flannel's, verbatim.
//
// It is test and demo infrastructure, not a runtime: no sandbox, no
// images. It needs root, nsenter and unshare (util-linux or busybox).
package cnilab

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"
)

// Conflist is the CNI config list upstream flannel's manifest installs as
// /etc/cni/net.d/10-flannel.conflist.
const Conflist = `{
  "name": "cbr0",
  "cniVersion": "0.3.1",
  "plugins": [
    {
      "type": "flannel",
      "delegate": {
        "hairpinMode": true,
        "isDefaultGateway": true
      }
    },
    {
      "type": "portmap",
      "capabilities": {
        "portMappings": true
      }
    }
  ]
}`

// Paths a node's plugins see, as on a real node.
const (
	SubnetFile = "/run/flannel/subnet.env"
	// FlannelDataDir is the flannel plugin's default dataDir.
	FlannelDataDir = "/var/lib/cni/flannel"
	// HostLocalDir is host-local's default store.
	HostLocalDir = "/var/lib/cni/networks"
)

// boundDirs are the directories bound per node, by the path the plugins
// see.
func boundDirs() []string { return []string{"/run/flannel", "/var/lib/cni"} }

// Node runs CNI plugins for the pods of one node namespace.
type Node struct {
	// NSPath is the node's network namespace (e.g. /run/netns/<name>).
	NSPath string
	// Root holds the node's directories; Path maps a plugin path into it.
	Root string

	cfg  *libcni.CNIConfig
	list *libcni.NetworkConfigList
}

// Options describe a Node.
type Options struct {
	// NSPath is the node's network namespace path (required).
	NSPath string
	// Root is the node's directory on the host (required); created.
	Root string
	// BinDirs is CNI_PATH: where the plugins are (required).
	BinDirs []string
	// Conflist is the config list (default Conflist).
	Conflist string
	// CacheDir is libcni's result cache (default Root/var/lib/cni/cache,
	// where containerd keeps it).
	CacheDir string
}

// New prepares a Node: its directories and the parsed conflist.
func New(opts Options) (*Node, error) {
	if opts.NSPath == "" || opts.Root == "" || len(opts.BinDirs) == 0 {
		return nil, errors.New("cnilab: NSPath, Root and BinDirs are required")
	}
	if opts.Conflist == "" {
		opts.Conflist = Conflist
	}
	list, err := libcni.ConfListFromBytes([]byte(opts.Conflist))
	if err != nil {
		return nil, fmt.Errorf("cnilab: conflist: %w", err)
	}
	n := &Node{NSPath: opts.NSPath, Root: opts.Root, list: list}
	for _, d := range boundDirs() {
		if err := os.MkdirAll(n.Path(d), 0o755); err != nil {
			return nil, fmt.Errorf("cnilab: %w", err)
		}
		// The mount point itself, on the host: an empty directory.
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("cnilab: %w", err)
		}
	}
	if opts.CacheDir == "" {
		opts.CacheDir = n.Path("/var/lib/cni/cache")
	}
	n.cfg = libcni.NewCNIConfigWithCacheDir(opts.BinDirs, opts.CacheDir, &nodeExec{n: n})
	return n, nil
}

// Path is where a path the node's plugins see lives on the host, for the
// bound directories (/run/flannel/..., /var/lib/cni/...); other paths are
// returned unchanged.
func (n *Node) Path(p string) string {
	for _, d := range boundDirs() {
		if p == d || strings.HasPrefix(p, d+"/") {
			return filepath.Join(n.Root, p)
		}
	}
	return p
}

func (n *Node) rt(containerID, netnsPath, ifName string) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{ContainerID: containerID, NetNS: netnsPath, IfName: ifName}
}

// Add runs ADD of the conflist for a container and returns the result in
// the current CNI version.
func (n *Node) Add(ctx context.Context, containerID, netnsPath, ifName string) (*current.Result, error) {
	r, err := n.cfg.AddNetworkList(ctx, n.list, n.rt(containerID, netnsPath, ifName))
	if err != nil {
		return nil, err
	}
	return current.NewResultFromResult(r)
}

// Del runs DEL of the conflist for a container.
func (n *Node) Del(ctx context.Context, containerID, netnsPath, ifName string) error {
	return n.cfg.DelNetworkList(ctx, n.list, n.rt(containerID, netnsPath, ifName))
}

// Check runs CHECK of the conflist (for a conflist of version 0.4.0 or
// later) with the cached result of the container's ADD.
func (n *Node) Check(ctx context.Context, containerID, netnsPath, ifName string) error {
	return n.cfg.CheckNetworkList(ctx, n.list, n.rt(containerID, netnsPath, ifName))
}

// Status runs STATUS of the conflist (1.1.0 and later).
func (n *Node) Status(ctx context.Context) error {
	return n.cfg.GetStatusNetworkList(ctx, n.list)
}

// nodeExec runs a plugin the way a runtime on the node would, but from
// this process: in the node's network namespace, with the node's
// directories bound over the standard paths in a mount namespace of its
// own (so nothing is mounted on the host).
type nodeExec struct{ n *Node }

// enterScript binds $1.. (pairs of host dir, plugin path) and execs the
// plugin, the last argument.
const enterScript = `set -e
while [ $# -gt 1 ]; do mount --bind "$1" "$2"; shift 2; done
exec "$1"`

func (e *nodeExec) ExecPlugin(ctx context.Context, pluginPath string, stdin []byte, environ []string) ([]byte, error) {
	return e.n.Run(ctx, pluginPath, stdin, environ)
}

// Run runs one plugin binary on the node as a runtime does: environ holds
// CNI_COMMAND and the rest, stdin the config. A plugin's error result
// comes back as a *types.Error.
func (n *Node) Run(ctx context.Context, pluginPath string, stdin []byte, environ []string) ([]byte, error) {
	e := &nodeExec{n: n}
	args := []string{"--net=" + e.n.NSPath, "--", "unshare", "--mount", "--propagation", "private", "--", "sh", "-c", enterScript, "sh"}
	for _, d := range boundDirs() {
		args = append(args, e.n.Path(d), d)
	}
	args = append(args, pluginPath)
	cmd := exec.CommandContext(ctx, "nsenter", args...)
	cmd.Env = environ
	cmd.Stdin = bytes.NewReader(stdin)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		// A plugin reports its error as JSON on stdout.
		var te types.Error
		if json.Unmarshal(stdout.Bytes(), &te) == nil && (te.Code != 0 || te.Msg != "") {
			return nil, &te
		}
		return nil, fmt.Errorf("cnilab: run %s in %s: %w (stderr: %s)", filepath.Base(pluginPath), e.n.NSPath, err, strings.TrimSpace(stderr.String()))
	}
	return stdout.Bytes(), nil
}

func (e *nodeExec) FindInPath(plugin string, paths []string) (string, error) {
	return invoke.FindInPath(plugin, paths)
}

func (e *nodeExec) Decode(b []byte) (version.PluginInfo, error) {
	return (&version.PluginDecoder{}).Decode(b)
}
