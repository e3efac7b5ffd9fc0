package dockerhost

import (
	"context"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/flannelkit/flannel/internal/testenv"
)

// Require fails (strict mode) or skips the test when a prerequisite of
// the harness is missing: root, dockerd and the docker CLI, docker-init,
// nsenter, unshare, busybox-static.
func Require(t testing.TB) {
	t.Helper()
	testenv.RequireRoot(t)
	_, _, err := Tools()
	testenv.Require(t, err == nil, "dockerd and the docker CLI (hack/test.sh installs Debian's docker.io)")
	for _, tool := range []string{"docker-init", "nsenter", "unshare", "/bin/busybox"} {
		_, err := exec.LookPath(tool)
		testenv.Require(t, err == nil, tool+" (hack/test.sh installs docker.io and busybox-static)")
	}
}

// NewT builds a cluster for a test (Require first), with the units of
// this repository's examples/systemd when o.Units is empty, and closes it
// in t.Cleanup, logging the hosts' logs if the test failed.
func NewT(t testing.TB, o Options) *Cluster {
	t.Helper()
	Require(t)
	if o.Units == "" {
		o.Units = unitsDir(t)
	}
	c, err := New(context.Background(), o)
	if err != nil {
		t.Fatalf("dockerhost: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			for _, h := range c.Hosts {
				for _, l := range []string{"flanneld", "dockerd"} {
					t.Logf("%s %s log:\n%s", h.Name, l, h.Log(l, 40))
				}
			}
		}
		if err := c.Close(); err != nil {
			t.Errorf("dockerhost: close: %v", err)
		}
	})
	return c
}

// unitsDir is this repository's examples/systemd.
func unitsDir(t testing.TB) string {
	t.Helper()
	root, err := testenv.RepoRoot()
	if err != nil {
		t.Fatalf("dockerhost: %v", err)
	}
	return filepath.Join(root, "examples", "systemd")
}
