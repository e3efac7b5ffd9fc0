package systemd

import (
	"bufio"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/internal/daemon"
)

// directives returns the unit file's Key=Value lines, in order.
func directives(t *testing.T, name string) [][2]string {
	t.Helper()
	f, err := os.Open(name)
	require.NoError(t, err)
	defer f.Close()
	var out [][2]string
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		l := strings.TrimSpace(sc.Text())
		if l == "" || strings.HasPrefix(l, "#") || strings.HasPrefix(l, "[") {
			continue
		}
		k, v, ok := strings.Cut(l, "=")
		require.True(t, ok, "line %q", l)
		out = append(out, [2]string{k, v})
	}
	require.NoError(t, sc.Err())
	return out
}

func values(ds [][2]string, key string) []string {
	var out []string
	for _, d := range ds {
		if d[0] == key {
			out = append(out, d[1])
		}
	}
	return out
}

func TestFlanneldUnitFlagsParse(t *testing.T) {
	t.Parallel()
	ds := directives(t, "flanneld.service")
	starts := values(ds, "ExecStart")
	require.Len(t, starts, 1)
	args := strings.Fields(starts[0])
	assert.Equal(t, "/usr/local/bin/flanneld", args[0])
	c, err := daemon.Parse(args[1:], func(string) string { return "" }, io.Discard)
	require.NoError(t, err)
	assert.True(t, c.IPMasq)
	assert.Equal(t, "/run/flannel/subnet.env", c.SubnetFile)
	assert.Equal(t, 8471, c.HealthzPort)
	// The daemon says when it is ready (sd_notify), so ExecStartPost and
	// docker.service start after subnet.env is complete.
	assert.Equal(t, []string{"notify"}, values(ds, "Type"))

	// The etcd endpoints come from the environment, so that
	// /etc/default/flanneld can set them (a flag would win over it).
	assert.NotContains(t, starts[0], "--etcd-endpoints")
	env := map[string]string{}
	for _, e := range values(ds, "Environment") {
		k, v, _ := strings.Cut(e, "=")
		env[k] = v
	}
	assert.Equal(t, "http://127.0.0.1:2379", env["FLANNELD_ETCD_ENDPOINTS"])
	c, err = daemon.Parse(args[1:], func(k string) string { return env[k] }, io.Discard)
	require.NoError(t, err)
	assert.Equal(t, []string{"http://127.0.0.1:2379"}, c.EtcdEndpoints)
	assert.Equal(t, []string{"-/etc/default/flanneld"}, values(ds, "EnvironmentFile"))
}

// TestDockerOptsChain runs the ExecStartPost's docker-opts arguments on a
// subnet.env and checks that the drop-in reads the file and the variable
// it writes.
func TestDockerOptsChain(t *testing.T) {
	t.Parallel()
	post := values(directives(t, "flanneld.service"), "ExecStartPost")
	require.Len(t, post, 1)
	i := strings.Index(post[0], "docker-opts")
	require.Positive(t, i)
	args := strings.Fields(strings.TrimSuffix(post[0][i+len("docker-opts"):], "'"))

	dir := t.TempDir()
	env := filepath.Join(dir, "subnet.env")
	require.NoError(t, os.WriteFile(env, []byte("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"), 0o644))
	out := filepath.Join(dir, "docker")
	var optsFile string
	for j := range args {
		switch args[j] {
		case "-f":
			assert.Equal(t, "/run/flannel/subnet.env", args[j+1])
			args[j+1] = env
		case "-d":
			optsFile = args[j+1]
			args[j+1] = out
		}
	}
	require.NoError(t, daemon.DockerOptsCommand(args, io.Discard, io.Discard))
	b, err := os.ReadFile(out)
	require.NoError(t, err)
	assert.Equal(t, "DOCKER_OPTS=\"--bip=10.244.3.1/24 --ip-masq=false --mtu=1450\"\n", string(b))

	drop := directives(t, "docker-flannel.conf")
	assert.Equal(t, []string{optsFile}, values(drop, "EnvironmentFile"))
	starts := values(drop, "ExecStart")
	require.Len(t, starts, 2, "reset, then dockerd")
	assert.Empty(t, starts[0])
	assert.Contains(t, starts[1], "$DOCKER_OPTS")
	assert.Contains(t, values(drop, "After"), "flanneld.service")

	// subnet.env as the Agent writes it round-trips through docker-opts.
	got, err := flannel.ReadSubnetEnv(env)
	require.NoError(t, err)
	assert.Equal(t, 1450, got.MTU)
}
