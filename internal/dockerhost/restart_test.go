package dockerhost

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/internal/nlsafe"
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
// Docker's own choosing appears. A dockerd started by hand without them
// gets 172.17.0.1/16; started again in the right order, docker0 has the
// flannel subnet alone.
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

	// dockerd started by hand without flannel's options: Docker's own
	// bridge, outside the flannel network.
	optsFile := h.Path(c.units.DockerEnvFile)
	require.NoError(t, os.WriteFile(optsFile, []byte("DOCKER_OPTS=\"\"\n"), 0o644))
	require.NoError(t, h.StartDocker(ctx))
	link, err := h.Lab.Handle.LinkByName("docker0")
	require.NoError(t, err)
	addrs, err := nlsafe.Wrap(h.Lab.Handle).AddrList(link, syscall.AF_INET)
	require.NoError(t, err)
	require.Len(t, addrs, 1)
	t.Logf("dockerd without options: docker0 %s", addrs[0].IPNet)
	h.StopDocker(syscall.SIGTERM)
	require.NoError(t, os.Remove(optsFile))

	require.NoError(t, h.StartFlanneld(ctx))
	require.NoError(t, h.StartDocker(ctx))
	env, err := h.SubnetEnv()
	require.NoError(t, err)
	_, err = h.Run(ctx, "c0", "sleep", "3600")
	require.NoError(t, err)
	// The bridge moved to the flannel subnet: dockerd replaced the
	// address it had chosen itself.
	checkBridge(t, h, env.Subnet, env.MTU)
}

// sweepChild is set in the environment of the test binary TestSweep
// starts as the run that gets killed.
const sweepChild = "DOCKERHOST_SWEEP_CHILD"

// TestSweep: a run killed with SIGKILL (no cleanup at all) leaves
// flanneld, dockerd, containerd, shims and a container behind; Sweep in
// the next run removes them, the cgroups, the state directory and the
// lab's namespaces.
func TestSweep(t *testing.T) {
	if os.Getenv(sweepChild) != "" {
		runSweepChild(t)
		return
	}
	Require(t)
	child := exec.Command(os.Args[0], "-test.run=^TestSweep$", "-test.v")
	child.Env = append(os.Environ(), sweepChild+"=1", "DOCKERHOST_FLANNELD="+bins.flanneld, "DOCKERHOST_WHOAMI="+bins.whoami)
	out, err := child.StdoutPipe()
	require.NoError(t, err)
	child.Stderr = os.Stderr
	require.NoError(t, child.Start())
	var lab string
	var pids []int
	sc := bufio.NewScanner(out)
	for sc.Scan() {
		if f := strings.Fields(sc.Text()); len(f) > 1 && f[0] == "SWEEP-CHILD" {
			lab = f[1]
			for _, p := range f[2:] {
				pid, err := strconv.Atoi(p)
				require.NoError(t, err)
				pids = append(pids, pid)
			}
			break
		}
	}
	require.NoError(t, child.Process.Kill())
	_ = child.Wait()
	require.NotEmpty(t, lab, "the child run did not come up")
	go func() { _, _ = io.Copy(io.Discard, out) }()

	left := 0
	for _, pid := range pids {
		if alive(pid) {
			left++
		}
	}
	t.Logf("the killed run left %d of %d processes running (its daemons get SIGKILL as it dies, shims and containers do not)", left, len(pids))
	assert.True(t, alive(pids[len(pids)-1]), "the container outlives the killed run")
	assert.DirExists(t, filepath.Join(StateDir, lab))

	require.NoError(t, Sweep())
	assert.NoDirExists(t, filepath.Join(StateDir, lab))
	for _, hier := range hierarchies() {
		m, _ := filepath.Glob(filepath.Join(hier, cgroupPrefix+lab+"-*"))
		assert.Empty(t, m, "cgroups left in %s", hier)
	}
	m, _ := filepath.Glob("/run/netns/" + lab + "-*")
	assert.Empty(t, m, "namespaces left")
	for _, pid := range pids {
		assert.False(t, alive(pid), "process %d left", pid)
	}
}

// alive says whether pid runs (a zombie does not count).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndex(s, ")")+1:])
	return len(f) > 0 && f[0] != "Z"
}

// runSweepChild is the run TestSweep kills: a started host-gw host with a
// container; it prints the lab and the pids of dockerd, containerd, the
// shim and the container, then waits to be killed.
func runSweepChild(t *testing.T) {
	ctx := context.Background()
	c, err := New(ctx, Options{
		Hosts: 1, Flanneld: os.Getenv("DOCKERHOST_FLANNELD"), Units: unitsDir(t),
		Network: `{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}`,
	})
	require.NoError(t, err)
	require.NoError(t, c.Start(ctx))
	h := c.Hosts[0]
	_, err = h.Run(ctx, "c0", "sleep", "3600")
	require.NoError(t, err)
	pids := []string{strconv.Itoa(h.dockerd.Cmd.Process.Pid), strconv.Itoa(h.flanneld.Cmd.Process.Pid)}
	for _, d := range hierarchies()[:1] {
		b, err := os.ReadFile(filepath.Join(d, h.cgroup, "cgroup.procs"))
		require.NoError(t, err)
		pids = append(pids, strings.Fields(string(b))...)
	}
	pid, err := h.Docker(ctx, "inspect", "-f", "{{.State.Pid}}", "c0")
	require.NoError(t, err)
	fmt.Printf("SWEEP-CHILD %s %s %s\n", c.Lab.Name, strings.Join(pids, " "), pid)
	select {}
}
