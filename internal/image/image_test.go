package image_test

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/internal/cnilab"
	"github.com/flannelkit/flannel/internal/image"
	"github.com/flannelkit/flannel/internal/testenv"
)

// TestBuildReproducible builds the image twice from the same inputs (same
// digest, byte-identical archives), then runs what is in it: nft and
// iptables with the libraries packed next to them, flanneld, the CNI
// plugins.
func TestBuildReproducible(t *testing.T) {
	testenv.RequireRoot(t)
	root, err := testenv.RepoRoot()
	require.NoError(t, err)
	plugins := cnilab.PluginDir(t)
	dir := t.TempDir()
	build := func(out string) image.Result {
		res, err := image.Build(t.Context(), image.Options{
			Repo: root, Go: testenv.GoBinary(), CNIPlugins: plugins,
			Tag: "ghcr.io/flannelkit/flanneld:test", Out: filepath.Join(dir, out), Version: "test",
		})
		require.NoError(t, err)
		return res
	}
	a, b := build("a.tar"), build("b.tar")
	assert.Equal(t, a.Digest, b.Digest, "same inputs, same digest")
	ab, err := os.ReadFile(filepath.Join(dir, "a.tar"))
	require.NoError(t, err)
	bb, err := os.ReadFile(filepath.Join(dir, "b.tar"))
	require.NoError(t, err)
	assert.Equal(t, ab, bb, "byte-identical archives")
	oci := build("c" + image.OCISuffix)
	assert.Equal(t, a.Digest, oci.Digest, "the OCI archive holds the same image")
	assert.Contains(t, strings.Join(a.Packages, " "), "nftables:amd64=")
	assert.Contains(t, strings.Join(a.Packages, " "), "iptables:amd64=")

	img, err := tarball.ImageFromPath(filepath.Join(dir, "a.tar"), nil)
	require.NoError(t, err)
	rootfs := t.TempDir()
	layers, err := img.Layers()
	require.NoError(t, err)
	for _, l := range layers {
		rc, err := l.Uncompressed()
		require.NoError(t, err)
		cmd := exec.Command("tar", "x", "-C", rootfs)
		cmd.Stdin = rc
		out, err := cmd.CombinedOutput()
		rc.Close()
		require.NoError(t, err, "%s", out)
	}
	for _, c := range [][]string{
		{"/usr/sbin/nft", "--version"}, {"/usr/sbin/iptables", "--version"}, {"/usr/sbin/ip6tables-legacy", "--version"},
		{"/usr/sbin/iptables-save", "--version"}, {"/flanneld", "--version"}, {"/cni/bin/flannel"}, {"/cni/bin/bridge"},
	} {
		out, err := exec.Command("chroot", append([]string{rootfs}, c...)...).CombinedOutput()
		if len(c) == 1 { // a CNI plugin without CNI_COMMAND prints its versions and exits 0
			require.NoError(t, err, "%v: %s", c, out)
			assert.Contains(t, string(out), "CNI protocol versions supported")
			continue
		}
		require.NoError(t, err, "%v in the image: %s", c, out)
	}
	// iptables really programs the kernel from the image (in a throwaway
	// network namespace).
	out, err := exec.Command("unshare", "-n", "chroot", rootfs, "/usr/sbin/iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.244.0.0/16", "-j", "MASQUERADE").CombinedOutput()
	require.NoError(t, err, "%s", out)
	cf, err := img.ConfigFile()
	require.NoError(t, err)
	assert.Equal(t, []string{"/flanneld"}, cf.Config.Entrypoint)
	assert.True(t, cf.Created.IsZero(), "no creation time")
}
