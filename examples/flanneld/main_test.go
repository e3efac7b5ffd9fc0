package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/etcdstore"
	"github.com/flannelkit/flannel/internal/etcdtest"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/lease"
)

// binary is the flanneld built once by TestMain.
var binary string

func TestMain(m *testing.M) {
	os.Exit(buildAndRun(m))
}

func buildAndRun(m *testing.M) int {
	dir, err := os.MkdirTemp("", "flanneld-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	gobin := testenv.GoBinary()
	binary = filepath.Join(dir, "flanneld")
	out, err := exec.Command(gobin, "build", "-o", binary, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "build flanneld: %v\n%s", err, out)
		return 1
	}
	return m.Run()
}

const (
	healthzPort = 8471
	etcdPort    = 2379
)

var (
	clusterNet  = netip.MustParsePrefix("10.244.0.0/16")
	clusterNet6 = netip.MustParsePrefix("fd00:10:244::/56")
)

// variant is one daemon cluster setup.
type variant struct {
	name    string
	backend string
	dual    bool // IPv4 + IPv6 underlay and network
	nft     bool // EnableNFTables
}

func (v variant) netConf() []byte {
	v6 := ""
	if v.dual {
		v6 = `"EnableIPv6":true,"IPv6Network":"` + clusterNet6.String() + `",`
	}
	return []byte(fmt.Sprintf(`{"Network":"%s",%s"EnableNFTables":%t,"Backend":{"Type":"%s"}}`, clusterNet, v6, v.nft, v.backend))
}

// world is a lab with etcd reachable from every node at the router's
// address, and one daemon process slot per node.
type world struct {
	t     *testing.T
	lab   *netlab.Lab
	etcd  *etcdtest.Server
	store *etcdstore.Store
	dir   string
	procs []*proc
	pods  []*netlab.Pod
	// storeArgs, when set, replaces the etcd flags of node i's daemon.
	storeArgs func(i int) []string
	// env is added to every daemon's environment.
	env func(i int) []string
}

type proc struct {
	cmd  *exec.Cmd
	done chan error
	log  string
}

// newLab is a world without a store: the lab and the daemon slots.
func newLab(t *testing.T, nodes int, dual bool) *world {
	testenv.RequireRoot(t)
	for _, b := range []string{"ip", "nft", "iptables"} {
		_, err := exec.LookPath(b)
		testenv.Require(t, err == nil, b+" not installed")
	}
	w := &world{t: t, lab: netlab.NewT(t, netlab.Options{Nodes: nodes, IPv4: true, IPv6: dual}), dir: t.TempDir(), procs: make([]*proc, nodes), pods: make([]*netlab.Pod, nodes)}
	t.Cleanup(func() {
		for i := range w.procs {
			w.stop(i, syscall.SIGKILL)
		}
	})
	return w
}

func newWorld(t *testing.T, nodes int, dual bool) *world {
	w := newLab(t, nodes, dual)
	w.etcd = etcdtest.NewT(t, etcdtest.Options{})
	c := etcdtest.ClientT(t, w.etcd)
	var err error
	w.store, err = etcdstore.New(c, etcdstore.Options{})
	require.NoError(t, err)
	u, err := url.Parse(w.etcd.Endpoints[0])
	require.NoError(t, err)
	w.relay(etcdPort, u.Host)
	return w
}

// relay makes target (on the test's loopback) reachable from every node
// at the router's address and port.
func (w *world) relay(port uint16, target string) {
	w.t.Helper()
	rt, err := netns.GetFromName(w.lab.NSName("rt"))
	require.NoError(w.t, err)
	w.t.Cleanup(func() { rt.Close() })
	stop, err := netlab.Relay(rt, netip.AddrPortFrom(netlab.RouterIP(0), port).String(), target)
	require.NoError(w.t, err)
	w.t.Cleanup(stop)
}

func (w *world) subnetFile(i int) string { return filepath.Join(w.dir, fmt.Sprintf("node%d.env", i)) }

func (w *world) args(i int, extra ...string) []string {
	store := []string{fmt.Sprintf("--etcd-endpoints=http://%s", netip.AddrPortFrom(netlab.RouterIP(0), etcdPort))}
	if w.storeArgs != nil {
		store = w.storeArgs(i)
	}
	return append(append([]string{
		"netns", "exec", w.lab.Nodes[i].NSName, binary}, store...), append([]string{
		"--subnet-file=" + w.subnetFile(i),
		fmt.Sprintf("--healthz-port=%d", healthzPort),
		"--iface=eth0", "--ip-masq", "--ip-blackhole-route", "-v=1",
	}, extra...)...)
}

// start runs the daemon of node i in its namespace.
func (w *world) start(i int, extra ...string) {
	w.t.Helper()
	p := &proc{done: make(chan error, 1), log: filepath.Join(w.dir, fmt.Sprintf("node%d-%d.log", i, time.Now().UnixNano()))}
	f, err := os.Create(p.log)
	require.NoError(w.t, err)
	p.cmd = exec.Command("ip", w.args(i, extra...)...)
	p.cmd.Stdout, p.cmd.Stderr = f, f
	if w.env != nil {
		p.cmd.Env = append(os.Environ(), w.env(i)...)
	}
	require.NoError(w.t, p.cmd.Start())
	go func() { p.done <- p.cmd.Wait(); f.Close() }()
	w.procs[i] = p
	w.t.Cleanup(func() {
		if w.t.Failed() {
			b, _ := os.ReadFile(p.log)
			w.t.Logf("node%d log:\n%s", i, b)
		}
	})
}

// stop signals node i's daemon and waits for it; it returns its exit error.
func (w *world) stop(i int, sig syscall.Signal) error {
	p := w.procs[i]
	if p == nil {
		return nil
	}
	w.procs[i] = nil
	_ = p.cmd.Process.Signal(sig)
	select {
	case err := <-p.done:
		return err
	case <-time.After(30 * time.Second):
		_ = p.cmd.Process.Kill()
		return errors.New("daemon did not stop")
	}
}

// get fetches path from node i's health server, connecting from inside
// the node's namespace.
func (w *world) get(ctx context.Context, i int, path string) (int, string, error) {
	n := w.lab.Nodes[i]
	tr := &http.Transport{DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
		var c net.Conn
		err := nlsafe.InNamespace(n.NS, func() error {
			var err error
			d := net.Dialer{Timeout: 2 * time.Second}
			c, err = d.DialContext(ctx, network, addr)
			return err
		})
		return c, err
	}, DisableKeepAlives: true}
	defer tr.CloseIdleConnections()
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, fmt.Sprintf("http://%s%s", netip.AddrPortFrom(n.IP, healthzPort), path), nil)
	if err != nil {
		return 0, "", err
	}
	resp, err := (&http.Client{Transport: tr}).Do(req)
	if err != nil {
		return 0, "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b), err
}

func (w *world) status(i int, path string) int {
	code, _, err := w.get(w.t.Context(), i, path)
	if err != nil {
		return 0
	}
	return code
}

func (w *world) waitReady(i int) {
	w.t.Helper()
	require.Eventually(w.t, func() bool {
		select {
		case err := <-w.procs[i].done:
			w.t.Fatalf("node%d daemon exited: %v", i, err)
		default:
		}
		return w.status(i, "/readyz") == http.StatusOK
	}, 60*time.Second, 100*time.Millisecond, "node%d ready", i)
}

func (w *world) lease(i int) lease.Lease {
	w.t.Helper()
	env, err := flannel.ReadSubnetEnv(w.subnetFile(i))
	require.NoError(w.t, err)
	return env.Lease()
}

// routes returns node i's routes into the cluster network other than the
// kernel's own (the pod bridge's subnet): what the backend programmed.
func (w *world) routes(i int) map[netip.Prefix]bool {
	w.t.Helper()
	rs, err := nlsafe.Wrap(w.lab.Nodes[i].Handle).RouteList(nil, netlink.FAMILY_ALL)
	require.NoError(w.t, err)
	out := map[netip.Prefix]bool{}
	for _, r := range rs {
		if r.Protocol == unix.RTPROT_KERNEL || r.Dst == nil {
			continue
		}
		p, ok := ipconv.PrefixFromIPNet(r.Dst)
		if !ok {
			continue
		}
		for _, n := range []netip.Prefix{clusterNet, clusterNet6} {
			if p.Bits() >= n.Bits() && n.Contains(p.Addr()) {
				out[p] = true
			}
		}
	}
	return out
}

// ruleset returns node i's nftables and iptables rules as the tools print
// them.
func (w *world) ruleset(i int) string {
	w.t.Helper()
	out, err := exec.Command("ip", "netns", "exec", w.lab.Nodes[i].NSName, "sh", "-c", "nft list ruleset; iptables-save; ip6tables-save").CombinedOutput()
	require.NoError(w.t, err, "%s", out)
	return string(out)
}

// flannelLinks returns node i's devices named flannel*.
func (w *world) flannelLinks(i int) []string {
	w.t.Helper()
	links, err := nlsafe.Wrap(w.lab.Nodes[i].Handle).LinkList()
	require.NoError(w.t, err)
	var out []string
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, "flannel") {
			out = append(out, l.Attrs().Name)
		}
	}
	return out
}

func (w *world) addPod(i int) {
	w.t.Helper()
	l := w.lease(i)
	p, err := w.lab.Nodes[i].AddPod("p", l.Subnet, l.IPv6Subnet)
	require.NoError(w.t, err)
	w.pods[i] = p
}

func (w *world) pingAll() {
	w.t.Helper()
	for i, a := range w.pods {
		for j, b := range w.pods {
			if i == j {
				continue
			}
			for _, ip := range []netip.Addr{b.IP, b.IPv6} {
				if !ip.IsValid() {
					continue
				}
				ctx, cancel := context.WithTimeout(w.t.Context(), 20*time.Second)
				assert.NoError(w.t, a.Ping(ctx, ip), "pod%d -> pod%d %s", i, j, ip)
				cancel()
			}
		}
	}
}

// pingWhile pings pod a -> pod b in rounds of one second while fn runs and
// returns the number of rounds that got no answer.
func (w *world) pingWhile(a, b int, fn func()) (lost, rounds int) {
	stop := make(chan struct{})
	res := make(chan [2]int, 1)
	go func() {
		lost, rounds := 0, 0
		for {
			select {
			case <-stop:
				res <- [2]int{lost, rounds}
				return
			default:
			}
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			if err := w.pods[a].Ping(ctx, w.pods[b].IP); err != nil {
				lost++
			}
			cancel()
			rounds++
			time.Sleep(10 * time.Millisecond) // spare the CPU
		}
	}()
	fn()
	close(stop)
	r := <-res
	return r[0], r[1]
}

// killRestart kills node i's daemon with SIGKILL and starts it again while
// pod from pings pod i, and checks that no ping round was lost and that the
// node kept its lease.
func (w *world) killRestart(i, from int) {
	w.t.Helper()
	before := w.lease(i)
	lost, rounds := w.pingWhile(from, i, func() {
		_ = w.stop(i, syscall.SIGKILL)
		w.start(i)
		w.waitReady(i)
	})
	w.t.Logf("kill -9+restart: %d ping rounds, %d lost", rounds, lost)
	assert.Zero(w.t, lost, "ping rounds lost during kill -9 and restart (of %d)", rounds)
	assert.Equal(w.t, before, w.lease(i))
}

func TestDaemonCluster(t *testing.T) {
	for _, v := range []variant{
		{name: "host-gw", backend: "host-gw"},
		{name: "vxlan", backend: "vxlan"},
		{name: "vxlan-dualstack-nftables", backend: "vxlan", dual: true, nft: true},
	} {
		t.Run(v.name, func(t *testing.T) {
			t.Parallel()
			testDaemonCluster(t, v)
		})
	}
}

func testDaemonCluster(t *testing.T, v variant) {
	w := newWorld(t, 3, v.dual)
	// Before the network config exists the daemons are alive but not ready.
	w.start(0)
	w.start(1)
	require.Eventually(t, func() bool { return w.status(0, "/healthz") == http.StatusOK }, 30*time.Second, 100*time.Millisecond)
	assert.Equal(t, http.StatusServiceUnavailable, w.status(0, "/readyz"))
	require.NoError(t, w.store.PutConfig(t.Context(), v.netConf()))
	w.waitReady(0)
	w.waitReady(1)

	// node2 starts with two peers in etcd: once it says ready, their
	// routes are in its kernel.
	w.start(2)
	w.waitReady(2)
	r := w.routes(2)
	assert.True(t, r[w.lease(0).Subnet], "route to node0 when ready: %v", r)
	assert.True(t, r[w.lease(1).Subnet], "route to node1 when ready: %v", r)

	ruleset := w.ruleset(0)
	if v.nft {
		assert.Contains(t, ruleset, "table ip flannel-ipv4")
		assert.Contains(t, ruleset, "table ip6 flannel-ipv6")
		assert.NotContains(t, ruleset, "FLANNEL-POSTRTG")
	} else {
		assert.Contains(t, ruleset, "-A FLANNEL-POSTRTG")
		assert.NotContains(t, ruleset, "flannel-ipv4")
	}
	for i := range 3 {
		own := w.lease(i).Subnet
		assert.Eventually(t, func() bool { return w.routes(i)[own] }, 10*time.Second, 50*time.Millisecond, "node%d blackhole route for its own subnet", i)
		w.addPod(i)
	}
	// The blackhole route is level-triggered: deleted by hand, it is back
	// at once (from the route notification, well before the resync).
	bhSubnet := w.lease(0).Subnet
	require.NoError(t, w.lab.Nodes[0].Handle.RouteDel(&netlink.Route{
		Dst: ipconv.IPNetFromPrefix(bhSubnet), Type: unix.RTN_BLACKHOLE, Priority: 4242, Table: unix.RT_TABLE_MAIN,
	}), "delete node0's blackhole route")
	blackhole := func() bool {
		rs, err := nlsafe.Wrap(w.lab.Nodes[0].Handle).RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Type: unix.RTN_BLACKHOLE, Table: unix.RT_TABLE_MAIN}, netlink.RT_FILTER_TYPE|netlink.RT_FILTER_TABLE)
		require.NoError(t, err)
		for _, r := range rs {
			if p, ok := ipconv.PrefixFromIPNet(r.Dst); ok && p == bhSubnet {
				return true
			}
		}
		return false
	}
	// (RouteDel succeeded, so it was gone; the daemon may already have
	// put it back, so its absence is not checked.)
	assert.Eventually(t, blackhole, 10*time.Second, 20*time.Millisecond, "node0's blackhole route re-added")
	w.pingAll()

	// Metrics parse as Prometheus text and say what the node does.
	require.Eventually(t, func() bool {
		_, body, err := w.get(t.Context(), 0, "/metrics")
		if err != nil {
			return false
		}
		p := expfmt.NewTextParser(model.UTF8Validation)
		fams, err := p.TextToMetricFamilies(strings.NewReader(body))
		require.NoError(t, err)
		peers := fams["flannel_peers"].GetMetric()[0].GetGauge().GetValue()
		ready := fams["flannel_ready"].GetMetric()[0].GetGauge().GetValue()
		expiry := fams["flannel_lease_expiry_timestamp_seconds"].GetMetric()[0].GetGauge().GetValue()
		runs := fams["flannel_reconcile_total"].GetMetric()[0].GetCounter().GetValue()
		_, renewals := fams["flannel_lease_renewals_total"]
		return peers == 2 && ready == 1 && expiry > float64(time.Now().Unix()) && runs >= 1 && renewals
	}, 30*time.Second, 200*time.Millisecond, "node0 metrics")

	// SIGTERM leaves the datapath: no ping lost while node1 is down and
	// restarting; it keeps its subnet.
	before := w.lease(1)
	lost, rounds := w.pingWhile(0, 1, func() {
		require.NoError(t, w.stop(1, syscall.SIGTERM), "graceful stop exits 0")
		w.pingAll()
		w.start(1)
		w.waitReady(1)
	})
	t.Logf("SIGTERM+restart: %d ping rounds, %d lost", rounds, lost)
	assert.Zero(t, lost, "ping rounds lost during SIGTERM and restart (of %d)", rounds)
	assert.Equal(t, before, w.lease(1))

	// kill -9 too.
	w.killRestart(2, 0)
	w.pingAll()

	// --cleanup removes node2's routes, rules, lease and subnet file.
	own := w.lease(2)
	require.NoError(t, w.stop(2, syscall.SIGTERM))
	out, err := exec.Command("ip", w.args(2, "--cleanup")...).CombinedOutput()
	require.NoError(t, err, "%s", out)
	assert.Empty(t, w.routes(2))
	assert.Empty(t, w.flannelLinks(2))
	_, err = os.Stat(w.subnetFile(2))
	assert.ErrorIs(t, err, os.ErrNotExist)
	rules := w.ruleset(2)
	assert.NotContains(t, rules, "FLANNEL")
	assert.NotContains(t, rules, "flannel")
	// Its lease is gone from etcd: the others drop their routes to it.
	for _, i := range []int{0, 1} {
		require.Eventually(t, func() bool { return !w.routes(i)[own.Subnet] }, 30*time.Second, 100*time.Millisecond, "node%d route to node2 removed", i)
	}
	scan := bufio.NewScanner(strings.NewReader(string(out)))
	for scan.Scan() {
		assert.NotContains(t, scan.Text(), "level=ERROR")
	}
}

// TestBinaryCommandLine runs the binary for what needs no kernel: bad
// values exit 2 with the flag named, --version, and docker-opts.
func TestBinaryCommandLine(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	env := filepath.Join(dir, "subnet.env")
	require.NoError(t, os.WriteFile(env, []byte("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"), 0o644))
	tests := []struct {
		name     string
		args     []string
		env      []string
		code     int
		contains string
	}{
		{name: "bad flag value", args: []string{"--public-ip=10.0.0"}, code: 2, contains: "public-ip"},
		{name: "bad variable", env: []string{"FLANNELD_HEALTHZ_PORT=99999"}, code: 2, contains: "healthz-port"},
		{name: "kube without node", args: []string{"--kube-subnet-mgr"}, code: 2, contains: "NODE_NAME"},
		{name: "version", args: []string{"--version"}, code: 0, contains: "dev"},
		{name: "docker-opts", args: []string{"docker-opts", "-f", env, "-d", "-", "-c"}, code: 0,
			contains: `DOCKER_OPTS="--bip=10.244.7.1/24 --ip-masq=true --mtu=1450"`},
		{name: "docker-opts missing file", args: []string{"docker-opts", "-f", filepath.Join(dir, "none.env")}, code: 1, contains: "none.env"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cmd := exec.Command(binary, tc.args...)
			cmd.Env = append([]string{"PATH=" + os.Getenv("PATH")}, tc.env...)
			out, err := cmd.CombinedOutput()
			code := 0
			var ee *exec.ExitError
			if errors.As(err, &ee) {
				code = ee.ExitCode()
			} else {
				require.NoError(t, err)
			}
			assert.Equal(t, tc.code, code, "%s", out)
			assert.Contains(t, string(out), tc.contains)
		})
	}
}

// TestDaemonNotifiesSystemd: under a Type=notify unit (NOTIFY_SOCKET set)
// the daemon sends READY=1 once the node is ready, not before.
func TestDaemonNotifiesSystemd(t *testing.T) {
	t.Parallel()
	w := newWorld(t, 1, false)
	sock := filepath.Join(w.dir, "notify.sock")
	conn, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: sock, Net: "unixgram"})
	require.NoError(t, err)
	defer conn.Close()
	w.env = func(int) []string { return []string{"NOTIFY_SOCKET=" + sock} }
	w.start(0)
	msgs := make(chan string, 4)
	go func() {
		buf := make([]byte, 512)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- string(buf[:n])
		}
	}()
	// No network config yet: alive, not ready, nothing sent.
	require.Eventually(t, func() bool { return w.status(0, "/healthz") == http.StatusOK }, 30*time.Second, 100*time.Millisecond)
	select {
	case m := <-msgs:
		t.Fatalf("sent %q before the node was ready", m)
	default:
	}
	require.NoError(t, w.store.PutConfig(t.Context(), variant{backend: "host-gw"}.netConf()))
	select {
	case m := <-msgs:
		assert.Equal(t, "READY=1", m)
	case <-time.After(60 * time.Second):
		t.Fatal("no READY=1 from the daemon")
	}
	assert.Equal(t, http.StatusOK, w.status(0, "/readyz"), "ready when it said so")
	_, err = flannel.ReadCompleteSubnetEnv(w.subnetFile(0))
	assert.NoError(t, err, "subnet.env complete when it said ready")
	require.NoError(t, w.stop(0, syscall.SIGTERM))
}
