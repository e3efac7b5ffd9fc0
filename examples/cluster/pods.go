package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/flannelkit/flannel/cni"
	"github.com/flannelkit/flannel/internal/cnilab"
	"github.com/flannelkit/flannel/internal/netlab"
)

// pluginName is the name this binary answers to as the flannel CNI
// plugin: the demo links its own executable as <cni dir>/flannel, the way
// a K3s-style multicall binary is installed.
const pluginName = "flannel"

// isPlugin reports whether this binary was started as the flannel plugin.
func isPlugin() bool { return filepath.Base(os.Args[0]) == pluginName }

// servePlugin serves one CNI call and returns the exit code.
func servePlugin() int {
	if err := cni.Main(cni.Plugin{}); err != nil {
		if perr := err.Print(); perr != nil {
			fmt.Fprintln(os.Stderr, "flannel:", err.Error())
		}
		return 1
	}
	return 0
}

// referenceDirs are where the demo looks for bridge, host-local, loopback
// and portmap when -cni-bin-dir is not given: what hack/test.sh builds,
// then the standard place.
func referenceDirs() []string { return []string{".cache/bin/cni", "/opt/cni/bin"} }

// cniBinDir makes the demo's CNI_PATH: this executable as the flannel
// plugin and the reference plugins from dir (or the first of
// referenceDirs that has them).
func cniBinDir(tmp, dir string) (string, error) {
	dirs := referenceDirs()
	if dir != "" {
		dirs = []string{dir}
	}
	var from string
	for _, d := range dirs {
		ok := true
		for _, p := range cnilab.ReferencePlugins() {
			if _, err := os.Stat(filepath.Join(d, p)); err != nil {
				ok = false
			}
		}
		if ok {
			from = d
			break
		}
	}
	if from == "" {
		return "", fmt.Errorf("the CNI plugins %v are not in %v (hack/test.sh builds them into .cache/bin/cni; or pass -cni-bin-dir)", cnilab.ReferencePlugins(), dirs)
	}
	self, err := os.Executable()
	if err != nil {
		return "", err
	}
	bin := filepath.Join(tmp, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return "", err
	}
	links := map[string]string{pluginName: self}
	for _, p := range cnilab.ReferencePlugins() {
		abs, err := filepath.Abs(filepath.Join(from, p))
		if err != nil {
			return "", err
		}
		links[p] = abs
	}
	for name, target := range links {
		if err := os.Symlink(target, filepath.Join(bin, name)); err != nil {
			return "", err
		}
	}
	return bin, nil
}

// runtimes gives every node a CNI runtime with upstream's conflist; the
// node's agent writes subnet.env where the node's plugins read it.
func runtimes(tmp, bin string, lab *netlab.Lab) ([]*cnilab.Node, error) {
	var rts []*cnilab.Node
	for _, n := range lab.Nodes {
		rt, err := cnilab.New(cnilab.Options{NSPath: "/run/netns/" + n.NSName, Root: filepath.Join(tmp, n.Name), BinDirs: []string{bin}})
		if err != nil {
			return nil, fmt.Errorf("node %s: %w", n.Name, err)
		}
		rts = append(rts, rt)
	}
	return rts, nil
}

// delPods runs DEL for every pod, as a runtime does when pods stop.
func delPods(ctx context.Context, rts []*cnilab.Node, pods []*netlab.Pod) error {
	var errs []error
	for i, p := range pods {
		if p != nil {
			errs = append(errs, rts[i].DelPod(ctx, p))
		}
	}
	return errors.Join(errs...)
}
