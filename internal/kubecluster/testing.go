package kubecluster

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/flannelkit/flannel/internal/testenv"
)

// Binaries are the tools New needs in Options.Bin.
func Binaries() []string {
	return []string{"kube-apiserver", "kubelet", "kube-controller-manager", "kube-scheduler", "kube-proxy", "coredns"}
}

// BinDir is where hack/test.sh links the binaries (.cache/bin), and
// whether all are there.
func BinDir() (string, bool) {
	root, err := testenv.RepoRoot()
	if err != nil {
		return "", false
	}
	dir := filepath.Join(root, ".cache", "bin")
	for _, b := range Binaries() {
		if _, err := os.Stat(filepath.Join(dir, b)); err != nil {
			return dir, false
		}
	}
	return dir, true
}

// NewT starts a cluster for a test (strict mode fails when a prerequisite
// is missing) and closes it in t.Cleanup.
func NewT(t testing.TB, o Options) *Cluster {
	t.Helper()
	testenv.RequireRoot(t)
	bin, ok := BinDir()
	testenv.Require(t, ok, "the cluster binaries "+filepath.Join(bin, "{kubelet,kube-proxy,...}")+" (hack/test.sh builds them)")
	for _, tool := range []string{"containerd", "ctr", "runc", "containerd-shim-runc-v2", "nsenter", "unshare"} {
		_, err := lookPath(tool)
		testenv.Require(t, err == nil, tool+" (hack/test.sh installs Debian's containerd and runc)")
	}
	root, _ := testenv.RepoRoot()
	if o.Dir == "" {
		o.Dir = t.TempDir()
	}
	o.Bin, o.Repo, o.Go = bin, root, testenv.GoBinary()
	c, err := New(context.Background(), o)
	if err != nil {
		t.Fatalf("kubecluster: %v", err)
	}
	t.Cleanup(func() {
		if err := c.Close(); err != nil {
			t.Errorf("kubecluster: close: %v", err)
		}
	})
	return c
}
