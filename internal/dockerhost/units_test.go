package dockerhost

import (
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestReadUnits reads this repository's units (no root needed).
func TestReadUnits(t *testing.T) {
	t.Parallel()
	u, err := ReadUnits(filepath.Join("..", "..", "examples", "systemd"))
	require.NoError(t, err)
	assert.Equal(t, "/usr/local/bin/flanneld", u.FlanneldBin)
	assert.Contains(t, u.FlanneldArgs, "--ip-masq")
	assert.Contains(t, u.FlanneldEnv, "FLANNELD_ETCD_ENDPOINTS=http://127.0.0.1:2379")
	assert.True(t, u.Notify, "Type=notify")
	assert.Equal(t, "docker-opts", u.PostArgs[1])
	assert.Equal(t, "/run/flannel/docker", u.DockerEnvFile)
	assert.Contains(t, u.DockerdArgs, "$DOCKER_OPTS")
}

func TestDockerdArgs(t *testing.T) {
	t.Parallel()
	tmpl := []string{"$DOCKER_OPTS", "-H", "fd://", "--containerd=/run/containerd/containerd.sock", "--debug"}
	env := map[string]string{"DOCKER_OPTS": "--bip=10.244.3.1/24 --ip-masq=false --mtu=1450"}
	got, err := dockerdArgs(tmpl, env, "/run/x/docker.sock", "--data-root=/d")
	require.NoError(t, err)
	assert.Equal(t, []string{"--bip=10.244.3.1/24", "--ip-masq=false", "--mtu=1450", "-H", "unix:///run/x/docker.sock", "--debug", "--data-root=/d"}, got)
	_, err = dockerdArgs(tmpl, map[string]string{}, "/s")
	assert.ErrorContains(t, err, "$DOCKER_OPTS")
}
