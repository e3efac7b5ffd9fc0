package ipsec_test

import (
	"bytes"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"log/slog"
	"net/netip"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/internal/vmlab"
	"github.com/flannelkit/flannel/ipsec"
	"github.com/flannelkit/flannel/lease"
)

// vmModules are loaded at boot in the VM.
var vmModules = []string{"esp4", "xfrm_user", "xfrm_algo", "gcm", "ghash_generic", "ctr", "seqiv", "echainiv", "veth", "bridge", "nfnetlink", "drbg", "crypto_null", "esp6"}

// TestVM runs the TestInVM* tests of this package and TestDemoInVM
// (examples/cluster -backend ipsec, the README's demo) inside a qemu VM
// with a kernel that has ESP (the host's has not): one boot for all of
// them. Building the demo statically compiles its whole dependency graph
// (etcd) once more: seconds with a warm build cache, about three minutes on
// a cold one.
func TestVM(t *testing.T) {
	// The demo's pods get their addresses through the CNI plugins, as on
	// a real node: the reference plugins go to /opt/cni/bin in the VM.
	res := vmlab.RunVM(t, vmlab.Boot{
		Run: "^(TestInVM|TestDemoInVM)", Modules: vmModules, Timeout: 8 * time.Minute,
		Commands: map[string]string{"cluster": "../examples/cluster"}, Files: vmlab.CNIPlugins(t),
	})
	require.Contains(t, res.Output, "--- PASS: TestInVMReachability")
	require.Contains(t, res.Output, "--- PASS: TestDemoInVM")
	// inVM skips these tests on the host only: inside the VM none may skip.
	require.NotContains(t, res.Output, "--- SKIP", "a test skipped inside the VM")
}

// perPeer is the number of ESP states per peer: one outbound and one
// inbound per generation.
const perPeer = 1 + ipsec.Generations

// Policies per family: closedPols without peers (out allow to the own
// subnet and block to the cluster network from any source; in and fwd
// allow from the own subnet and block from the cluster network), and
// peerPols per peer (out, in, fwd between the pod subnets, and the same
// for the public addresses: host and SNAT sources).
const (
	closedPols = 6
	peerPols   = 6
)

var (
	inVM = vmlab.InVM
	ctxT = vmlab.Ctx
)

var (
	clusterPSK = strings.Repeat("cluster-psk-0123456789-", 5)
	otherPSK   = strings.Repeat("another-psk-9876543210-", 5)
)

type vnode struct {
	node  *netlab.Node
	psk   string
	opts  ipsec.Options
	b     *ipsec.Backend
	net   flannel.Network
	lease lease.Lease
	pod   *netlab.Pod
	logs  *testenv.LogBuffer
	env   flannel.Env
}

type vcluster struct {
	t     *testing.T
	lab   *netlab.Lab
	cfg   lease.Config
	nodes []*vnode
	gone  map[int]bool
}

func newCluster(t *testing.T, n int, psk func(i int) string, opts ipsec.Options) *vcluster {
	t.Helper()
	return newClusterFamilies(t, n, psk, opts, false)
}

// newClusterFamilies builds an IPv4 or (dual) a dual-stack cluster.
func newClusterFamilies(t *testing.T, n int, psk func(i int) string, opts ipsec.Options, dual bool) *vcluster {
	t.Helper()
	lab := netlab.NewT(t, netlab.Options{Nodes: n, IPv4: true, IPv6: dual})
	conf := `{"Network":"10.244.0.0/16","Backend":{"Type":"ipsec"}}`
	if dual {
		conf = `{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00:10:244::/56","Backend":{"Type":"ipsec"}}`
	}
	cfg, err := lease.ParseConfig([]byte(conf))
	require.NoError(t, err)
	c := &vcluster{t: t, lab: lab, cfg: cfg, gone: map[int]bool{}}
	for i, nd := range lab.Nodes {
		v := &vnode{node: nd, psk: psk(i), logs: &testenv.LogBuffer{}}
		v.opts = opts
		v.opts.PSK = []byte(v.psk)
		v.env = vmlab.NodeEnv(nd, cfg, slog.New(slog.NewJSONHandler(v.logs, &slog.HandlerOptions{Level: slog.LevelDebug})))
		c.nodes = append(c.nodes, v)
		c.start(i)
		v.pod, err = nd.AddPod("pod", v.lease.Subnet, v.lease.IPv6Subnet, netlab.WithMTU(v.net.MTU()))
		require.NoError(t, err)
	}
	return c
}

// start prepares and starts node i's backend (a fresh key, as an agent
// start does).
func (c *vcluster) start(i int) {
	t := c.t
	v := c.nodes[i]
	b, err := ipsec.New(v.opts)
	require.NoError(t, err)
	attrs, err := b.Prepare(t.Context(), v.env)
	require.NoError(t, err)
	v.b = b
	v.lease = lease.Lease{Subnet: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i + 1), 0}), 24), Attrs: attrs}
	if c.cfg.EnableIPv6 {
		v.lease.IPv6Subnet = netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%x::/64", i+1))
	}
	v.net, err = b.Start(t.Context(), v.lease)
	require.NoError(t, err)
	v.lease = v.net.Lease() // the key bound to the lease
}

func (c *vcluster) leases() []lease.Lease {
	var ls []lease.Lease
	for i, v := range c.nodes {
		if !c.gone[i] {
			ls = append(ls, v.lease)
		}
	}
	return ls
}

// apply gives every node the current lease set and returns each Apply's
// error.
func (c *vcluster) apply() []error {
	errs := make([]error, len(c.nodes))
	for i, v := range c.nodes {
		if c.gone[i] {
			continue
		}
		var peers []lease.Lease
		for j, l := range c.leases() {
			_ = j
			if l.Subnet != v.lease.Subnet {
				peers = append(peers, l)
			}
		}
		errs[i] = v.net.Apply(c.t.Context(), peers)
	}
	return errs
}

func (c *vcluster) applyOK() {
	for i, err := range c.apply() {
		require.NoError(c.t, err, "node %d apply", i)
	}
}

func (c *vcluster) checkAllPairs() {
	pods := make([]*netlab.Pod, len(c.nodes))
	for i, v := range c.nodes {
		if !c.gone[i] {
			pods[i] = v.pod
		}
	}
	vmlab.CheckPairs(c.t, pods, 20*time.Second)
}

// capture counts the frames on a node's underlay interface.
type capture struct {
	esp, udpESP, plain atomic.Int64
	frags              atomic.Int64 // IPv4 fragments (MF or offset set)
	maxESP             atomic.Int64 // largest IPv4 ESP packet
	// markerInESP counts ESP frames whose bytes hold the marker when read:
	// with ESP in UDP, the receiving node decrypts the very buffer that a
	// capture on the same veth/bridge path shares, so this can be non-zero
	// without plain text on the wire (TestInVMUDPEncap checks that).
	markerInESP atomic.Int64
	marker      []byte
	first       string // first plain frame's headers (set before plain counts it)
	stop        func()
}

// startCapture listens on every interface of the lab's segment 0, i.e. on
// the wire between the nodes. (A capture on a node's own interface would
// also see the inner packets the kernel re-injects there after decrypting
// tunnel-mode ESP.)
func startCapture(t *testing.T, lab *netlab.Lab, marker []byte) *capture {
	t.Helper()
	c := &capture{marker: marker}
	c.stop = vmlab.Tap(t, lab, func(f []byte) {
		if len(f) < 14+20 {
			return
		}
		isESP := false
		if f[12] == 0x08 && f[13] == 0x00 {
			ip := f[14:]
			if binary.BigEndian.Uint16(ip[6:8])&0x3fff != 0 {
				c.frags.Add(1)
			}
			switch ip[9] {
			case unix.IPPROTO_ESP:
				c.esp.Add(1)
				isESP = true
				if l := int64(binary.BigEndian.Uint16(ip[2:4])); l > c.maxESP.Load() {
					c.maxESP.Store(l) // one reader goroutine: no race on the max
				}
			case unix.IPPROTO_UDP:
				hl := int(ip[0]&0xf) * 4
				if len(ip) >= hl+4 && (ip[hl+2] == 0x11 && ip[hl+3] == 0x94) {
					c.udpESP.Add(1)
					isESP = true
				}
			}
		}
		if bytes.Contains(f, c.marker) {
			if isESP {
				c.markerInESP.Add(1)
			} else if c.plain.Add(1) == 1 {
				c.first = fmt.Sprintf("% x", f[:min(len(f), 54)])
			}
		}
	})
	return c
}

// sendMarker sends marker over TCP from pod a to pod b (IPv4) and reports
// whether b received it.
func sendMarker(t *testing.T, a, b *netlab.Pod, marker []byte, timeout time.Duration) error {
	t.Helper()
	return vmlab.SendMarker(t, a, b, b.IP, marker, timeout)
}

func xfrmStates(t *testing.T, h *netlink.Handle) []netlink.XfrmState {
	t.Helper()
	s, err := nlsafe.Wrap(h).XfrmStateList(netlink.FAMILY_ALL)
	require.NoError(t, err)
	return s
}

func xfrmPolicies(t *testing.T, h *netlink.Handle) []netlink.XfrmPolicy {
	t.Helper()
	p, err := nlsafe.Wrap(h).XfrmPolicyList(netlink.FAMILY_ALL)
	require.NoError(t, err)
	return p
}

func spis(t *testing.T, h *netlink.Handle) map[int]bool {
	out := map[int]bool{}
	for _, s := range xfrmStates(t, h) {
		out[s.Spi] = true
	}
	return out
}

// checkLogsFree asserts that no node's log holds the PSKs or any ESP key
// currently installed (hex or base64).
func (c *vcluster) checkLogsFree() {
	t := c.t
	var secrets []string
	for _, v := range c.nodes {
		secrets = append(secrets, v.psk)
		for _, s := range xfrmStates(t, v.node.Handle) {
			if s.Aead != nil {
				secrets = append(secrets, hex.EncodeToString(s.Aead.Key), base64.StdEncoding.EncodeToString(s.Aead.Key), string(s.Aead.Key))
			}
		}
	}
	for i, v := range c.nodes {
		logs := v.logs.String()
		for _, s := range secrets {
			assert.NotContains(t, logs, s, "node %d log holds a secret", i)
		}
	}
}

func TestInVMReachability(t *testing.T) {
	inVM(t)
	c := newCluster(t, 3, func(int) string { return clusterPSK }, ipsec.Options{})
	marker := []byte("PLAINTEXT-MARKER-" + fmt.Sprint(time.Now().UnixNano()))
	capt := startCapture(t, c.lab, marker)
	// Started, not applied yet: the cluster network is already closed.
	for i, v := range c.nodes {
		assert.Len(t, xfrmPolicies(t, v.node.Handle), closedPols, "node %d: allow and block policies after Start", i)
	}
	assert.Error(t, sendMarker(t, c.nodes[0].pod, c.nodes[1].pod, marker, 2*time.Second))
	sendUDPMarker(t, c.nodes[0].pod, c.nodes[1].pod, marker, 3)
	c.applyOK()
	c.checkAllPairs()
	for i := range 3 {
		for j := range 3 {
			if i != j {
				require.NoError(t, sendMarker(t, c.nodes[i].pod, c.nodes[j].pod, marker, 10*time.Second), "marker %d->%d", i, j)
			}
		}
	}
	capt.stop()
	assert.Positive(t, capt.esp.Load(), "ESP seen on the underlay")
	assert.Zero(t, capt.plain.Load(), "plain-text marker seen on the underlay; first frame: %s", capt.first)
	// 2 peers x (out + inbound per generation) states, policies: allow, block, 2 x (out, in, fwd).
	for i, v := range c.nodes {
		assert.Len(t, xfrmStates(t, v.node.Handle), 2*perPeer, "node %d states", i)
		assert.Len(t, xfrmPolicies(t, v.node.Handle), closedPols+2*peerPols, "node %d policies", i)
	}
	// Idempotent.
	c.applyOK()
	assert.Equal(t, 1446, c.nodes[0].net.MTU())
	// A full-size packet with DF fits in one ESP packet on the wire.
	capt = startCapture(t, c.lab, marker)
	require.NoError(t, vmlab.UDPEchoSized(t, c.nodes[0].pod, c.nodes[1].pod, c.nodes[0].net.MTU()-28, 10*time.Second))
	capt.stop()
	assert.Zero(t, capt.frags.Load(), "outer ESP packets were fragmented: MTU overhead too small")
	assert.Equal(t, int64(1500), capt.maxESP.Load(), "a full-size pod packet fills the underlay MTU exactly")
	assert.Zero(t, capt.plain.Load())
	c.checkLogsFree()
}

func TestInVMDualStack(t *testing.T) {
	inVM(t)
	c := newClusterFamilies(t, 2, func(int) string { return clusterPSK }, ipsec.Options{}, true)
	capt := startCapture(t, c.lab, []byte("PLAINTEXT-MARKER-DUAL"))
	c.applyOK()
	c.checkAllPairs()
	capt.stop()
	assert.Equal(t, 1426, c.nodes[0].net.MTU(), "the IPv6 overhead bounds a dual-stack node")
	// Per family: one peer x (out + inbound per generation).
	assert.Len(t, xfrmStates(t, c.nodes[0].node.Handle), 2*perPeer)
	// allow + block + out/in/fwd, per family.
	assert.Len(t, xfrmPolicies(t, c.nodes[0].node.Handle), 2*(closedPols+peerPols))
	assert.Positive(t, capt.esp.Load())
	assert.Zero(t, capt.plain.Load())
}

// TestDemoInVM runs examples/cluster -backend ipsec on the VM's kernel
// (TestVM).
func TestDemoInVM(t *testing.T) {
	inVM(t)
	out, err := exec.CommandContext(t.Context(), "/bin/cluster", "-backend", "ipsec", "-store", "memory", "-nodes", "3").CombinedOutput()
	t.Logf("examples/cluster -backend ipsec:\n%s", out)
	require.NoError(t, err)
	assert.Contains(t, string(out), "backend ipsec, store memory: all pairs reachable")
}
