package ipip_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/etcdstore"
	"github.com/flannelkit/flannel/internal/etcdtest"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/internal/vmlab"
	"github.com/flannelkit/flannel/internal/vmtest"
	"github.com/flannelkit/flannel/ipip"
	"github.com/flannelkit/flannel/lease"
)

// upstreamEnv names a statically built upstream flanneld (built from its
// source for this check only, never committed) for TestVMUpstream.
const upstreamEnv = "FLANNEL_UPSTREAM_FLANNELD"

// TestVMUpstream runs a mixed cluster in the VM: two nodes with our Agent
// and the ipip backend, one with upstream's flanneld, all on one etcd.
// Opt-in: set FLANNEL_UPSTREAM_FLANNELD to the upstream binary.
func TestVMUpstream(t *testing.T) {
	bin := os.Getenv(upstreamEnv)
	if bin == "" || vmtest.Inside() {
		t.Skip("opt-in: set " + upstreamEnv + " to a static upstream flanneld (CGO_ENABLED=0 go build in its source)")
	}
	res := vmlab.RunVM(t, vmlab.Boot{
		Run: "^TestUpstreamInVM", Modules: slices.Concat(vmModules, []string{"br_netfilter"}), Timeout: 10 * time.Minute,
		Files:    map[string]string{"bin/upstream-flanneld": bin},
		MemoryMB: 1536, // the upstream binary is 77 MB in the initramfs
	})
	require.Contains(t, res.Output, "--- PASS: TestUpstreamInVM")
}

// forward accepts on l and copies each connection to and from dst.
func forward(ctx context.Context, l net.Listener, dst string) {
	var wg sync.WaitGroup
	defer wg.Wait()
	go func() { <-ctx.Done(); l.Close() }()
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		wg.Go(func() {
			defer c.Close()
			d, err := net.Dial("tcp", dst)
			if err != nil {
				return
			}
			defer d.Close()
			go func() { <-ctx.Done(); c.Close(); d.Close() }()
			go io.Copy(d, c)
			io.Copy(c, d)
		})
	}
}

func TestUpstreamInVM(t *testing.T) {
	inVM(t)
	// node0 and node2 share segment 0, node1 is behind the router. Ours
	// on node0 and node1, upstream's on node2: node0 and node2 route
	// directly, node1 and the others through the tunnel.
	lab := netlab.NewT(t, netlab.Options{Nodes: 3, Segments: 2})
	conf := `{"Network":"10.244.0.0/16","Backend":{"Type":"ipip","DirectRouting":true}}`
	srv, err := etcdtest.New(etcdtest.Options{})
	require.NoError(t, err)
	t.Cleanup(func() { srv.Close() })
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	t.Cleanup(func() { cancel(); wg.Wait() })

	// etcd listens on the test's loopback; upstream's flanneld reaches it
	// at node0's address through a forwarder listening in node0.
	var l net.Listener
	require.NoError(t, nlsafe.InNamespace(lab.Nodes[0].NS, func() error {
		var err error
		l, err = net.Listen("tcp", net.JoinHostPort(lab.Nodes[0].IP.String(), "2379"))
		return err
	}))
	wg.Go(func() { forward(ctx, l, srv.Endpoints[0][len("http://"):]) })

	var logs testenv.LogBuffer
	log := slog.New(slog.NewTextHandler(&logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	newStore := func() *etcdstore.Store {
		c, err := etcdstore.NewClient(etcdstore.ClientOptions{Endpoints: srv.Endpoints})
		require.NoError(t, err)
		t.Cleanup(func() { c.Close() })
		s, err := etcdstore.New(c, etcdstore.Options{Logger: log})
		require.NoError(t, err)
		return s
	}
	require.NoError(t, newStore().PutConfig(ctx, []byte(conf)))

	// Upstream's flanneld on node2.
	dir := t.TempDir()
	var out bytes.Buffer
	up := exec.Command("/bin/upstream-flanneld", "-etcd-endpoints=http://"+l.Addr().String(), "-iface=eth0",
		"-ip-masq=false", "-iptables-forward-rules=false", "-subnet-file="+filepath.Join(dir, "subnet.env"), "-v=2")
	up.Stdout, up.Stderr = &out, &out
	require.NoError(t, nlsafe.InNamespace(lab.Nodes[2].NS, up.Start))
	t.Cleanup(func() {
		up.Process.Signal(syscall.SIGTERM)
		up.Wait()
		t.Logf("upstream flanneld output:\n%s", out.String())
	})

	agents := make([]*flannel.Agent, 2)
	for i := range agents {
		n := lab.Nodes[i]
		be, err := ipip.FromConfig(mustParse(t, conf))
		require.NoError(t, err)
		iface, err := backend.FindInterface(n.Handle, backend.InterfaceOptions{IPv4: true})
		require.NoError(t, err)
		agents[i], err = flannel.NewAgent(flannel.AgentOptions{Store: newStore(), Backend: be, Iface: iface, Handle: n.Handle, NS: n.NS, Logger: log.With("node", n.Name)})
		require.NoError(t, err)
		a := agents[i]
		wg.Go(func() { assert.NoError(t, a.Run(ctx)) })
	}
	var upEnv flannel.SubnetEnv
	require.Eventually(t, func() bool {
		upEnv, err = flannel.ReadCompleteSubnetEnv(filepath.Join(dir, "subnet.env"))
		return err == nil
	}, 120*time.Second, 100*time.Millisecond, "upstream's subnet.env")
	upLease := upEnv.Lease()
	assert.Equal(t, 1480, upEnv.MTU, "upstream's MTU")
	pods := make([]*netlab.Pod, 3)
	for i, a := range agents {
		select {
		case <-a.Ready():
		case <-time.After(90 * time.Second):
			t.Fatalf("agent %d not ready:\n%s", i, logs.String())
		}
		require.Eventually(t, func() bool { return a.State().Peers == 2 }, 60*time.Second, 50*time.Millisecond, "agent %d sees upstream's node", i)
		st := a.State()
		pods[i], err = lab.Nodes[i].AddPod("pod", st.Lease.Subnet, st.Lease.IPv6Subnet, netlab.WithMTU(st.MTU))
		require.NoError(t, err)
	}
	pods[2], err = lab.Nodes[2].AddPod("pod", upLease.Subnet, upLease.IPv6Subnet, netlab.WithMTU(upEnv.MTU))
	require.NoError(t, err)
	for i, a := range pods {
		for j, b := range pods {
			if i != j {
				require.NoError(t, a.Ping(ctxT(t, 60*time.Second), b.IP), "ping %d -> %d", i, j)
				require.NoError(t, a.TCPCheck(ctxT(t, 30*time.Second), b, b.IP), "tcp %d -> %d", i, j)
			}
		}
	}
	// Upstream's routes to ours are what ours are to each other, but for
	// the onlink flag upstream also leaves on its direct routes.
	up2 := &vnode{node: lab.Nodes[2]}
	st0, st1 := agents[0].State().Lease, agents[1].State().Lease
	all := routesOf(t, up2)
	assert.Contains(t, all, fmt.Sprintf("%s via %s dev eth0 onlink", st0.Subnet, lab.Nodes[0].IP))
	assert.Contains(t, all, fmt.Sprintf("%s via %s dev %s onlink", st1.Subnet, lab.Nodes[1].IP, ipip.DeviceName))
	t.Logf("upstream node2 routes: %v", all)
	for i, v := range []*vnode{{node: lab.Nodes[0]}, {node: lab.Nodes[1]}} {
		t.Logf("our node%d routes: %v", i, routesOf(t, v))
	}
	assert.Contains(t, routesOf(t, &vnode{node: lab.Nodes[0]}), fmt.Sprintf("%s via %s dev eth0", upLease.Subnet, lab.Nodes[2].IP))
	assert.Contains(t, routesOf(t, &vnode{node: lab.Nodes[1]}), fmt.Sprintf("%s via %s dev %s onlink", upLease.Subnet, lab.Nodes[2].IP, ipip.DeviceName))
}

func mustParse(t *testing.T, conf string) lease.Config {
	t.Helper()
	cfg, err := lease.ParseConfig([]byte(conf))
	require.NoError(t, err)
	return cfg
}

// routesOf renders every main-table IPv4 route with a gateway on v's node,
// whoever made it, as "dst via gw dev <name> [onlink]".
func routesOf(t *testing.T, v *vnode) []string {
	t.Helper()
	rs, err := nlsafe.Wrap(v.node.Handle).RouteListFiltered(netlink.FAMILY_V4, nil, 0)
	require.NoError(t, err)
	var out []string
	for _, r := range rs {
		if r.Gw == nil || r.Dst == nil {
			continue
		}
		l, err := v.node.Handle.LinkByIndex(r.LinkIndex)
		require.NoError(t, err)
		s := fmt.Sprintf("%s via %s dev %s", r.Dst, r.Gw, l.Attrs().Name)
		if r.Flags&unix.RTNH_F_ONLINK != 0 {
			s += " onlink"
		}
		out = append(out, s)
	}
	return out
}
