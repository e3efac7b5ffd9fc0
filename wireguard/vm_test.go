package wireguard_test

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/internal/vmlab"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/wireguard"
)

// vmModules are loaded at boot in the VM (xfrm_user: netlink handles
// open an XFRM socket too).
var vmModules = []string{"wireguard", "veth", "bridge", "xfrm_user", "nfnetlink"}

// TestVM runs the TestInVM* tests of this package inside a qemu VM whose
// kernel has WireGuard (the host's has not): one boot for all of them.
func TestVM(t *testing.T) {
	res := vmlab.RunVM(t, vmlab.Boot{Run: "^TestInVM", Modules: vmModules, Timeout: vmTimeout})
	require.Contains(t, res.Output, "--- PASS: TestInVMMatrix")
	require.Contains(t, res.Output, "--- PASS: TestInVMContract")
	// inVM skips these tests on the host only: inside the VM none may skip.
	require.NotContains(t, res.Output, "--- SKIP", "a test skipped inside the VM")
}

// TestVMDemo runs examples/cluster -backend wireguard in the VM. It is
// opt-in (FLANNEL_VM_DEMO=1), as ipsec's is: building the demo statically
// compiles its whole dependency graph once more; TestInVMAgents covers
// the same Agent + wireguard path in every run.
func TestVMDemo(t *testing.T) {
	if os.Getenv("FLANNEL_VM_DEMO") != "1" {
		t.Skip("opt-in: set FLANNEL_VM_DEMO=1 to build examples/cluster statically and run it with -backend wireguard in the VM")
	}
	res := vmlab.RunVM(t, vmlab.Boot{
		Run: "^TestDemoInVM", Modules: vmModules, Timeout: vmTimeout,
		Commands: map[string]string{"cluster": "../examples/cluster"}, Files: vmlab.CNIPlugins(t),
	})
	require.Contains(t, res.Output, "--- PASS: TestDemoInVM")
}

// TestDemoInVM runs examples/cluster -backend wireguard on the VM's kernel
// (TestVMDemo).
func TestDemoInVM(t *testing.T) {
	inVM(t)
	out, err := exec.CommandContext(t.Context(), "/bin/cluster", "-backend", "wireguard", "-store", "memory", "-nodes", "3", "-ipv6").CombinedOutput()
	t.Logf("examples/cluster -backend wireguard:\n%s", out)
	require.NoError(t, err)
	assert.Contains(t, string(out), "backend wireguard, store memory: all pairs reachable")
}

// vmTimeout bounds one VM run of this package's tests.
const vmTimeout = 15 * time.Minute

var (
	inVM = vmlab.InVM
	ctxT = vmlab.Ctx
)

// family is the address families of a test cluster.
type family struct{ v4, v6 bool }

var (
	ipv4 = family{v4: true}
	ipv6 = family{v6: true}
	dual = family{v4: true, v6: true}
)

func (f family) String() string {
	switch f {
	case ipv4:
		return "ipv4"
	case ipv6:
		return "ipv6"
	}
	return "dual"
}

type wnode struct {
	node    *netlab.Node
	opts    wireguard.Options
	b       *wireguard.Backend
	net     *wireguard.Network
	lease   lease.Lease
	pod     *netlab.Pod
	logs    *testenv.LogBuffer
	env     flannel.Env
	keyFile string
}

type wcluster struct {
	t     *testing.T
	lab   *netlab.Lab
	cfg   lease.Config
	fam   family
	nodes []*wnode
	gone  map[int]bool
}

// netConf is the net-conf.json of a test cluster; backend is the
// "Backend" object's keys after Type.
func netConf(f family, backend string) string {
	s := fmt.Sprintf(`{"EnableIPv4":%t,"EnableIPv6":%t`, f.v4, f.v6)
	if f.v4 {
		s += `,"Network":"10.244.0.0/16"`
	}
	if f.v6 {
		s += `,"IPv6Network":"fd00:10:244::/56"`
	}
	if backend != "" {
		backend = "," + backend
	}
	return s + `,"Backend":{"Type":"wireguard"` + backend + `}}`
}

// newCluster builds n nodes with a pod each; opts come from the
// configuration's Backend keys (backendKeys) plus extra's KeyFile-less
// fields (RepairInterval).
func newCluster(t *testing.T, n int, f family, backendKeys string, repair time.Duration) *wcluster {
	t.Helper()
	lab := netlab.NewT(t, netlab.Options{Nodes: n, IPv4: f.v4, IPv6: f.v6})
	cfg, err := lease.ParseConfig([]byte(netConf(f, backendKeys)))
	require.NoError(t, err)
	opts, err := wireguard.ParseConfig(cfg.Backend)
	require.NoError(t, err)
	opts.RepairInterval = repair
	c := &wcluster{t: t, lab: lab, cfg: cfg, fam: f, gone: map[int]bool{}}
	dir := t.TempDir()
	for i, nd := range lab.Nodes {
		v := &wnode{node: nd, logs: &testenv.LogBuffer{}, opts: opts}
		v.keyFile = filepath.Join(dir, nd.Name, "wgkey")
		v.opts.KeyFile = v.keyFile
		v.env = vmlab.NodeEnv(nd, cfg, slog.New(slog.NewJSONHandler(v.logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
		c.nodes = append(c.nodes, v)
		c.start(i)
		v.pod, err = nd.AddPod("pod", v.lease.Subnet, v.lease.IPv6Subnet, netlab.WithMTU(v.net.MTU()))
		require.NoError(t, err)
	}
	return c
}

// start prepares and starts node i's backend, as an agent (re)start does:
// a new Backend with the node's options (its key file).
func (c *wcluster) start(i int) {
	t := c.t
	v := c.nodes[i]
	b, err := wireguard.New(v.opts)
	require.NoError(t, err)
	attrs, err := b.Prepare(t.Context(), v.env)
	require.NoError(t, err)
	v.b = b
	v.lease = lease.Lease{Attrs: attrs}
	if c.fam.v4 {
		v.lease.Subnet = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i + 1), 0}), 24)
	}
	if c.fam.v6 {
		v.lease.IPv6Subnet = netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%x::/64", i+1))
	}
	nw, err := b.Start(t.Context(), v.lease)
	require.NoError(t, err)
	v.net = nw.(*wireguard.Network)
}

func (c *wcluster) peersOf(i int) []lease.Lease {
	var peers []lease.Lease
	for j, v := range c.nodes {
		if j != i && !c.gone[j] {
			peers = append(peers, v.lease)
		}
	}
	return peers
}

func (c *wcluster) applyOK() {
	for i, v := range c.nodes {
		if !c.gone[i] {
			require.NoError(c.t, v.net.Apply(c.t.Context(), c.peersOf(i)), "node %d apply", i)
		}
	}
}

// checkAllPairs pings and TCP-checks every ordered pod pair per family.
func (c *wcluster) checkAllPairs() {
	pods := make([]*netlab.Pod, len(c.nodes))
	for i, v := range c.nodes {
		if !c.gone[i] {
			pods[i] = v.pod
		}
	}
	vmlab.CheckPairs(c.t, pods, 30*time.Second)
}

// checkLogsFree asserts that no node's log holds a private key or the PSK.
func (c *wcluster) checkLogsFree(psk string) {
	t := c.t
	var secrets []string
	if psk != "" {
		secrets = append(secrets, psk)
	}
	for _, v := range c.nodes {
		if b, err := os.ReadFile(v.keyFile); err == nil {
			secrets = append(secrets, strings.TrimSpace(string(b)))
		}
		if d, err := wireguard.ReadDevice(v.node.NS, wireguard.DeviceName); err == nil {
			secrets = append(secrets, d.PrivateKey.String())
		}
	}
	for i, v := range c.nodes {
		logs := v.logs.String()
		for _, s := range secrets {
			assert.NotContains(t, logs, s, "node %d log holds a secret", i)
		}
	}
}

// peerKeys lists the public keys of the peers of device dev on node i.
func (c *wcluster) peerKeys(i int, dev string) []string {
	d, err := wireguard.ReadDevice(c.nodes[i].node.NS, dev)
	require.NoError(c.t, err)
	var out []string
	for _, p := range d.Peers {
		out = append(out, p.PublicKey.String())
	}
	return out
}
