package daemon

import (
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestKubeStoreSetupErrors covers what fails before the API is contacted.
func TestKubeStoreSetupErrors(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	good := filepath.Join(dir, "net-conf.json")
	require.NoError(t, os.WriteFile(good, []byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`), 0o644))
	bad := filepath.Join(dir, "bad.json")
	require.NoError(t, os.WriteFile(bad, []byte(`{"Network":"10.244.0.0/33"}`), 0o644))
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	tests := []struct {
		name    string
		c       Config
		wantErr string
	}{
		{"missing net-conf", Config{NetConfigPath: filepath.Join(dir, "none.json"), NodeName: "n"}, "none.json"},
		{"invalid net-conf", Config{NetConfigPath: bad, NodeName: "n"}, "bad.json"},
		{"missing kubeconfig", Config{NetConfigPath: good, NodeName: "n", KubeconfigFile: filepath.Join(dir, "kubeconfig")}, "kubernetes client config"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := newKubeStore(t.Context(), tc.c, log)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.wantErr)
		})
	}
}
