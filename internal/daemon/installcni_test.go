package daemon

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestInstallCNI(t *testing.T) {
	from, host := t.TempDir(), t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(from, "flannel"), []byte("new-flannel"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(from, "bridge"), []byte("new-bridge"), 0o755))
	bin := filepath.Join(host, "opt/cni/bin")
	require.NoError(t, os.MkdirAll(bin, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(bin, "flannel"), []byte("old"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(bin, "macvlan"), []byte("someone else's"), 0o755))
	conf := filepath.Join(from, "cni-conf.json")
	require.NoError(t, os.WriteFile(conf, []byte(`{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}},{"type":"portmap","capabilities":{"portMappings":true}}]}`), 0o644))
	dst := filepath.Join(host, "etc/cni/net.d/10-flannel.conflist")

	var out bytes.Buffer
	require.NoError(t, InstallCNICommand([]string{"-plugins", from, "-cni-bin-dir", bin, "-cni-conf", conf, "-cni-conf-file", dst}, &out, &out))
	// The conflist source is in the plugin dir here; it is copied as a
	// plain file too, which is harmless.
	for name, want := range map[string]string{"flannel": "new-flannel", "bridge": "new-bridge", "macvlan": "someone else's"} {
		b, err := os.ReadFile(filepath.Join(bin, name))
		require.NoError(t, err)
		assert.Equal(t, want, string(b), name)
		st, _ := os.Stat(filepath.Join(bin, name))
		assert.Equal(t, os.FileMode(0o755), st.Mode().Perm())
	}
	b, err := os.ReadFile(dst)
	require.NoError(t, err)
	assert.Contains(t, string(b), `"type":"flannel"`)
	assert.Contains(t, out.String(), `installed "`+dst+`"`)
	entries, _ := os.ReadDir(bin)
	for _, e := range entries {
		assert.NotContains(t, e.Name(), ".tmp-", "no temporary file left")
	}
	require.NoError(t, InstallCNICommand([]string{"-plugins", from, "-cni-bin-dir", bin, "-cni-conf", conf, "-cni-conf-file", dst}, &out, &out), "again")

	bad := filepath.Join(t.TempDir(), "bad.json")
	require.NoError(t, os.WriteFile(bad, []byte(`{"name":"cbr0","plugins":`), 0o644))
	err = InstallCNICommand([]string{"-plugins", "", "-cni-conf", bad, "-cni-conf-file", dst}, &out, &out)
	assert.ErrorContains(t, err, "is not a CNI config list")
	b, _ = os.ReadFile(dst)
	assert.Contains(t, string(b), `"type":"flannel"`, "a bad conflist does not replace the installed one")
	err = InstallCNICommand([]string{"-plugins", t.TempDir(), "-cni-bin-dir", bin}, &out, &out)
	assert.ErrorContains(t, err, "no plugin binaries in")
}
