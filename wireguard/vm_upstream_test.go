package wireguard_test

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netns"
	clientv3 "go.etcd.io/etcd/client/v3"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/etcdstore"
	"github.com/flannelkit/flannel/internal/etcdtest"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/internal/vmlab"
	"github.com/flannelkit/flannel/wireguard"
)

// upstreamEnv names a static upstream flanneld (v0.28.9, built from its
// source outside this repository) for TestVMUpstream.
const upstreamEnv = "FLANNEL_UPSTREAM_FLANNELD"

// TestVMUpstream runs a mixed cluster in the VM: two nodes of this
// library and one upstream flanneld on one etcd, all on the wireguard
// backend. It is opt-in: set FLANNEL_UPSTREAM_FLANNELD to the upstream
// binary (CGO_ENABLED=0 go build in upstream's source tree).
func TestVMUpstream(t *testing.T) {
	bin := os.Getenv(upstreamEnv)
	if bin == "" {
		t.Skip("opt-in: set " + upstreamEnv + " to a static upstream flanneld to run the mixed-cluster check in the VM")
	}
	// Upstream's flanneld refuses to start without br_netfilter.
	res := vmlab.RunVM(t, vmlab.Boot{
		Run: "^TestUpstreamInVM", Modules: slices.Concat(vmModules, []string{"br_netfilter"}), Timeout: vmTimeout,
		Files: map[string]string{"bin/flanneld-upstream": bin},
	})
	require.Contains(t, res.Output, "--- PASS: TestUpstreamInVM")
}

// TestUpstreamInVM: nodes 0 and 1 run Agents of this library, node 2 runs
// upstream's flanneld, for IPv4 and dual-stack in separate and auto mode;
// every pod pair talks both ways over ICMP and TCP, and the etcd values of
// both kinds of node have one shape.
func TestUpstreamInVM(t *testing.T) {
	inVM(t)
	const bin = "/bin/flanneld-upstream"
	_, err := os.Stat(bin)
	require.NoError(t, err, "the upstream binary is packed by TestVMUpstream")
	for _, tc := range []struct {
		fam  family
		mode wireguard.Mode
	}{{ipv4, wireguard.ModeSeparate}, {dual, wireguard.ModeSeparate}, {dual, wireguard.ModeAuto}} {
		t.Run(fmt.Sprintf("%s-%s", tc.fam, tc.mode), func(t *testing.T) { mixedCluster(t, bin, tc.fam, tc.mode) })
	}
}

func mixedCluster(t *testing.T, bin string, f family, mode wireguard.Mode) {
	lab := netlab.NewT(t, netlab.Options{Nodes: 3, IPv4: f.v4, IPv6: f.v6})
	etcd := etcdtest.NewT(t, etcdtest.Options{})
	client := etcdtest.ClientT(t, etcd)
	admin, err := etcdstore.New(client, etcdstore.Options{})
	require.NoError(t, err)
	require.NoError(t, admin.PutConfig(t.Context(), []byte(netConf(f, `"Mode":"`+string(mode)+`"`))))
	u, err := url.Parse(etcd.Endpoints[0])
	require.NoError(t, err)
	const etcdPort = 2379
	relay(t, lab, netip.AddrPortFrom(netlab.RouterIP(0), etcdPort).String(), u.Host)

	logs := &testenv.LogBuffer{}
	log := slog.New(slog.NewJSONHandler(logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait() })
	dir := t.TempDir()
	agents := make([]*flannel.Agent, 2)
	for i := range agents {
		n := lab.Nodes[i]
		st, err := etcdstore.New(client, etcdstore.Options{})
		require.NoError(t, err)
		cfg, err := st.Config(t.Context())
		require.NoError(t, err)
		be, err := wireguard.Constructor(wireguard.Options{KeyFile: filepath.Join(dir, n.Name, "wgkey")})(cfg)
		require.NoError(t, err)
		iface, err := backend.FindInterface(n.Handle, backend.InterfaceOptions{IPv4: f.v4, IPv6: f.v6})
		require.NoError(t, err)
		agents[i], err = flannel.NewAgent(flannel.AgentOptions{Store: st, Backend: be, Iface: iface, Handle: n.Handle, NS: n.NS, Logger: log.With("node", n.Name)})
		require.NoError(t, err)
		a := agents[i]
		wg.Go(func() { assert.NoError(t, a.Run(ctx)) })
	}
	for _, a := range agents {
		<-a.Ready()
	}
	up := startUpstream(t, lab.Nodes[2], bin, netip.AddrPortFrom(netlab.RouterIP(0), etcdPort), filepath.Join(dir, "upstream"))
	for i, a := range agents {
		require.Eventually(t, func() bool { return a.State().Peers == 2 }, 60*time.Second, 100*time.Millisecond, "agent %d sees the upstream node", i)
	}
	env := waitSubnetEnv(t, filepath.Join(dir, "upstream", "subnet.env"), f)
	var upSubnet, upSubnet6 netip.Prefix
	if f.v4 {
		upSubnet = netip.MustParsePrefix(env["FLANNEL_SUBNET"]).Masked()
	}
	if f.v6 {
		upSubnet6 = netip.MustParsePrefix(env["FLANNEL_IPV6_SUBNET"]).Masked()
	}
	upMTU, err := strconv.Atoi(env["FLANNEL_MTU"])
	require.NoError(t, err)
	t.Logf("upstream node: subnets %s %s, MTU %d", upSubnet, upSubnet6, upMTU)

	pods := make([]*netlab.Pod, 3)
	for i, a := range agents {
		st := a.State()
		pods[i], err = lab.Nodes[i].AddPod("pod", st.Lease.Subnet, st.Lease.IPv6Subnet, netlab.WithMTU(min(st.MTU, upMTU)))
		require.NoError(t, err)
	}
	pods[2], err = lab.Nodes[2].AddPod("pod", upSubnet, upSubnet6, netlab.WithMTU(upMTU))
	require.NoError(t, err)
	for i, a := range pods {
		for j, b := range pods {
			for _, ip := range []netip.Addr{b.IP, b.IPv6} {
				if i == j || !ip.IsValid() {
					continue
				}
				require.NoError(t, a.Ping(ctxT(t, 30*time.Second), ip), "ping %d->%d %s (node 2 is upstream)", i, j, ip)
				require.NoError(t, a.TCPCheck(ctxT(t, 30*time.Second), b, ip), "tcp %d->%d %s", i, j, ip)
			}
		}
	}
	// The etcd values as both implementations wrote them.
	resp, err := client.Get(t.Context(), "/coreos.com/network/subnets/", clientv3.WithPrefix())
	require.NoError(t, err)
	require.Len(t, resp.Kvs, 3)
	shape := regexp.MustCompile(`"BackendType":"wireguard","BackendData":\{"PublicKey":"[A-Za-z0-9+/]{43}=","Port":51820\}`)
	for _, kv := range resp.Kvs {
		t.Logf("%s = %s", kv.Key, kv.Value)
		if f.v4 {
			assert.Regexp(t, shape, string(kv.Value))
		}
	}
	require.NoError(t, up.stop())
}

// upstreamProc is a running upstream flanneld.
type upstreamProc struct {
	cmd  *exec.Cmd
	out  *testenv.LogBuffer
	done chan error
}

func (p *upstreamProc) log() string { return p.out.String() }

func (p *upstreamProc) stop() error {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
		return nil
	case <-time.After(30 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.done
		return io.ErrUnexpectedEOF
	}
}

// startUpstream runs upstream's flanneld in node n's namespace (the
// process is forked from a thread switched into it) with its key and
// subnet files in dir.
func startUpstream(t *testing.T, n *netlab.Node, bin string, etcd netip.AddrPort, dir string) *upstreamProc {
	t.Helper()
	require.NoError(t, os.MkdirAll(dir, 0o755))
	p := &upstreamProc{out: &testenv.LogBuffer{}, done: make(chan error, 1)}
	p.cmd = exec.Command(bin, "--etcd-endpoints=http://"+etcd.String(), "--iface=eth0",
		"--subnet-file="+filepath.Join(dir, "subnet.env"), "--iptables-forward-rules=false", "-v=2")
	p.cmd.Env = append(os.Environ(), "WIREGUARD_KEY_FILE="+filepath.Join(dir, "wgkey"))
	p.cmd.Stdout, p.cmd.Stderr = p.out, p.out
	require.NoError(t, n.Do(p.cmd.Start))
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		if t.Failed() {
			t.Logf("upstream flanneld log:\n%s", p.log())
		}
	})
	return p
}

// waitSubnetEnv waits for a subnet.env with the subnets of f and returns
// its variables.
func waitSubnetEnv(t *testing.T, path string, fam family) map[string]string {
	t.Helper()
	env := map[string]string{}
	require.Eventually(t, func() bool {
		f, err := os.Open(path)
		if err != nil {
			return false
		}
		defer f.Close()
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			if k, v, ok := strings.Cut(sc.Text(), "="); ok {
				env[k] = v
			}
		}
		return (!fam.v4 || env["FLANNEL_SUBNET"] != "") && (!fam.v6 || env["FLANNEL_IPV6_SUBNET"] != "") && env["FLANNEL_MTU"] != ""
	}, 60*time.Second, 100*time.Millisecond, "upstream wrote %s", path)
	return env
}

// relay accepts TCP connections on listen inside the lab's router
// namespace and relays them to target, dialled from the test's own
// namespace: how a node's process reaches the embedded etcd on loopback.
func relay(t *testing.T, lab *netlab.Lab, listen, target string) {
	rt, err := netns.GetFromName(lab.NSName("rt"))
	require.NoError(t, err)
	defer rt.Close()
	var ln net.Listener
	require.NoError(t, nlsafe.InNamespace(rt, func() error {
		var err error
		ln, err = net.Listen("tcp", listen)
		return err
	}))
	var wg sync.WaitGroup
	var mu sync.Mutex
	conns := map[net.Conn]bool{}
	wg.Go(func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			d, err := net.Dial("tcp", target)
			if err != nil {
				c.Close()
				continue
			}
			mu.Lock()
			conns[c], conns[d] = true, true
			mu.Unlock()
			wg.Go(func() { io.Copy(d, c); d.Close() })
			wg.Go(func() { io.Copy(c, d); c.Close() })
		}
	})
	t.Cleanup(func() {
		ln.Close()
		mu.Lock()
		for c := range conns {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
}
