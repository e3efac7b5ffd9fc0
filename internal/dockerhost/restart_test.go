package dockerhost

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

var pingStats = regexp.MustCompile(`(\d+) packets transmitted, (\d+) packets received`)

// TestRestarts: restarting flanneld (kill -9, start, SIGTERM, start, on
// every host) loses no packet between running containers at 100
// packets/s, and a restarted dockerd gets the same --bip (the lease is
// stable) and its containers the network again.
func TestRestarts(t *testing.T) {
	ctx := t.Context()
	c := newCluster(t, 2, "vxlan")
	require.NoError(t, c.Start(ctx))
	a, b := c.Hosts[0], c.Hosts[1]
	ipA, err := a.Run(ctx, "ca", "sleep", "3600")
	require.NoError(t, err)
	_, err = b.Run(ctx, "cb", "sleep", "3600")
	require.NoError(t, err)
	_, err = b.Docker(ctx, "exec", "cb", "ping", "-c", "1", "-W", "5", ipA.String())
	require.NoError(t, err)
	opts := func(h *Host) string {
		b, err := os.ReadFile(h.Path(c.units.DockerEnvFile))
		require.NoError(t, err)
		return string(b)
	}
	before := []string{opts(a), opts(b)}

	const count = 2000 // 20 s at 100 packets/s
	type result struct {
		out string
		err error
	}
	done := make(chan result, 1)
	go func() {
		out, err := b.Docker(ctx, "exec", "cb", "ping", "-q", "-i", "0.01", "-c", strconv.Itoa(count), ipA.String())
		done <- result{out, err}
	}()
	for _, h := range c.Hosts {
		h.StopFlanneld(syscall.SIGKILL)
		require.NoError(t, h.StartFlanneld(ctx))
		h.StopFlanneld(syscall.SIGTERM)
		require.NoError(t, h.StartFlanneld(ctx))
	}
	select {
	case r := <-done:
		t.Fatalf("the ping ended before the restarts did: %v %s", r.err, r.out)
	default:
	}
	r := <-done
	require.NoError(t, r.err)
	m := pingStats.FindStringSubmatch(r.out)
	require.NotNil(t, m, "ping output %q", r.out)
	assert.Equal(t, strconv.Itoa(count), m[1], "transmitted")
	assert.Equal(t, m[1], m[2], "received as many as transmitted")
	assert.Equal(t, before, []string{opts(a), opts(b)}, "docker-opts wrote the same options after the restarts")

	// dockerd restart: same options, same bridge, containers reach b.
	args, err := a.DockerdArgs()
	require.NoError(t, err)
	a.StopDocker(syscall.SIGTERM)
	require.NoError(t, a.StartDocker(ctx))
	again, err := a.DockerdArgs()
	require.NoError(t, err)
	assert.Equal(t, args, again)
	env, err := a.SubnetEnv()
	require.NoError(t, err)
	assert.Equal(t, "--bip="+env.Subnet.String(), again[0])
	_, err = a.Docker(ctx, "start", "ca")
	require.NoError(t, err)
	ipA2, err := a.Docker(ctx, "inspect", "-f", "{{.NetworkSettings.IPAddress}}", "ca")
	require.NoError(t, err)
	checkBridge(t, a, env.Subnet, env.MTU)
	_, err = b.Docker(ctx, "exec", "cb", "ping", "-c", "3", "-W", "5", ipA2)
	require.NoError(t, err)
}

// TestWrongOrder: docker-opts before flanneld has written subnet.env (or
// while it is incomplete) fails and says why; dockerd is not started
// without its options (systemd's EnvironmentFile), so no bridge of
// Docker's own choosing appears. In the right order it then works.
func TestWrongOrder(t *testing.T) {
	ctx := t.Context()
	c := newCluster(t, 1, "vxlan")
	h := c.Hosts[0]
	out, err := h.DockerOpts(ctx)
	require.Error(t, err)
	assert.Contains(t, out, "/run/flannel/subnet.env does not exist")
	assert.Contains(t, out, "start flanneld first")
	err = h.StartDocker(ctx)
	assert.ErrorContains(t, err, "EnvironmentFile /run/flannel/docker")
	_, err = h.Lab.Handle.LinkByName("docker0")
	assert.Error(t, err, "no docker0")

	partial := h.Path("/run/flannel/subnet.env")
	require.NoError(t, os.WriteFile(partial, []byte("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\n"), 0o644))
	out, err = h.DockerOpts(ctx)
	require.Error(t, err)
	assert.Contains(t, out, "incomplete")
	assert.Contains(t, out, "FLANNEL_MTU")
	assert.NoFileExists(t, h.Path(c.units.DockerEnvFile))
	require.NoError(t, os.Remove(partial))

	require.NoError(t, h.StartFlanneld(ctx))
	require.NoError(t, h.StartDocker(ctx))
	env, err := h.SubnetEnv()
	require.NoError(t, err)
	_, err = h.Run(ctx, "c0", "sleep", "3600")
	require.NoError(t, err)
	checkBridge(t, h, env.Subnet, env.MTU)
}

// TestSweep: what a killed run leaves (its owner gone) is removed by
// Sweep: dockerd, containerd, the containers, the cgroups, the files.
func TestSweep(t *testing.T) {
	ctx := t.Context()
	c := newCluster(t, 1, "host-gw")
	require.NoError(t, c.Start(ctx))
	h := c.Hosts[0]
	_, err := h.Run(ctx, "c0", "sleep", "3600")
	require.NoError(t, err)
	pidOf := func(args ...string) int {
		out, err := h.Docker(ctx, args...)
		require.NoError(t, err)
		pid, err := strconv.Atoi(out)
		require.NoError(t, err)
		return pid
	}
	container := pidOf("inspect", "-f", "{{.State.Pid}}", "c0")
	dockerd := h.dockerd.cmd.Process.Pid

	// The owner "died": a pid that has exited.
	dead := exec.Command("true")
	require.NoError(t, dead.Run())
	root := filepath.Dir(h.Root)
	require.NoError(t, os.WriteFile(filepath.Join(root, "owner"), []byte(strconv.Itoa(dead.Process.Pid)+" 1\n"), 0o644))
	require.NoError(t, Sweep())

	assert.NoDirExists(t, root)
	for _, hier := range hierarchies() {
		assert.NoDirExists(t, filepath.Join(hier, h.cgroup))
	}
	<-h.dockerd.done // reaped by its waiter once killed
	assert.Error(t, syscall.Kill(container, 0), "container process gone")
	assert.True(t, h.dockerd.exited(), "dockerd %d gone", dockerd)
}
