package cnilab

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/testenv"
)

// EnvPlugins overrides where the reference CNI plugins are.
const EnvPlugins = "FLANNEL_CNI_PLUGINS"

// ReferencePlugins are the plugins hack/test.sh builds from tools/cni.
func ReferencePlugins() []string { return []string{"bridge", "host-local", "loopback", "portmap"} }

// PluginDir returns the directory of the reference plugins (hack/test.sh
// builds them into .cache/bin/cni), failing the test in strict mode when it
// is missing.
func PluginDir(tb testing.TB) string {
	tb.Helper()
	dir, ok := testenv.Tool("cni", EnvPlugins)
	for _, p := range ReferencePlugins() {
		if _, err := os.Stat(filepath.Join(dir, p)); err != nil {
			ok = false
		}
	}
	testenv.Require(tb, ok, "the reference CNI plugins (bridge, host-local, loopback, portmap) in "+dir+" (hack/test.sh builds them from tools/cni; or set "+EnvPlugins+")")
	return dir
}

// BinDirT returns a CNI_PATH directory holding the flannel plugin, built
// from examples/flannel-cni, and the reference plugins.
func BinDirT(tb testing.TB) string {
	tb.Helper()
	testenv.RequireRoot(tb)
	plugins := PluginDir(tb)
	root, err := testenv.RepoRoot()
	if err != nil {
		tb.Fatal(err)
	}
	dir := tb.TempDir()
	build := exec.Command(testenv.GoBinary(), "build", "-o", filepath.Join(dir, "flannel"), "./examples/flannel-cni")
	build.Dir = root
	if out, err := build.CombinedOutput(); err != nil {
		tb.Fatalf("build the flannel CNI plugin: %v\n%s", err, out)
	}
	for _, p := range ReferencePlugins() {
		if err := os.Symlink(filepath.Join(plugins, p), filepath.Join(dir, p)); err != nil {
			tb.Fatal(err)
		}
	}
	return dir
}

// NodeT is New for a netlab node, with its directories in a test
// directory.
func NodeT(tb testing.TB, nd *netlab.Node, binDir string, conflist string) *Node {
	tb.Helper()
	n, err := New(Options{NSPath: "/run/netns/" + nd.NSName, Root: tb.TempDir(), BinDirs: []string{binDir}, Conflist: conflist})
	if err != nil {
		tb.Fatal(err)
	}
	return n
}
