package cni_test

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"golang.org/x/sync/errgroup"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/hostgw"
	"github.com/flannelkit/flannel/internal/cnilab"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/memstore"
	"github.com/flannelkit/flannel/vxlan"
)

// cluster is nodes of a netlab Lab, each with a real Agent that writes the
// node's subnet.env and a CNI runtime (cnilab) that runs the real plugins
// with upstream's conflist.
type cluster struct {
	lab    *netlab.Lab
	cfg    lease.Config
	agents []*flannel.Agent
	cni    []*cnilab.Node
	logs   []*testenv.LogBuffer
}

func netConf(backendType string, dual bool) string {
	if dual {
		return `{"EnableIPv6":true,"Network":"10.244.0.0/16","IPv6Network":"fd00:10:244::/56","Backend":{"Type":"` + backendType + `"}}`
	}
	return `{"Network":"10.244.0.0/16","Backend":{"Type":"` + backendType + `"}}`
}

// newCluster starts n nodes and waits until every agent is ready and has
// programmed every peer.
func newCluster(t *testing.T, n int, backendType string, dual bool) *cluster {
	t.Helper()
	testenv.RequireRoot(t)
	bin := cnilab.BinDirT(t)
	cfg, err := lease.ParseConfig([]byte(netConf(backendType, dual)))
	require.NoError(t, err)
	lab := netlab.NewT(t, netlab.Options{Nodes: n, IPv4: true, IPv6: dual})
	store := memstore.New(cfg, memstore.Options{})
	reg := backend.NewRegistry()
	require.NoError(t, reg.Register(hostgw.Type, hostgw.FromConfig))
	require.NoError(t, reg.Register(vxlan.Type, vxlan.FromConfig))
	c := &cluster{lab: lab, cfg: cfg}
	for _, nd := range lab.Nodes {
		be, err := reg.New(cfg)
		require.NoError(t, err)
		iface, err := backend.FindInterface(nd.Handle, backend.InterfaceOptions{IPv4: true, IPv6: dual})
		require.NoError(t, err)
		node := cnilab.NodeT(t, nd, bin, cnilab.Conflist)
		logs := &testenv.LogBuffer{}
		a, err := flannel.NewAgent(flannel.AgentOptions{
			Store: store, Backend: be, Iface: iface, Handle: nd.Handle, NS: nd.NS,
			Logger:     slog.New(slog.NewTextHandler(logs, nil)),
			SubnetFile: node.Path(cnilab.SubnetFile),
			IPMasq:     true,
		})
		require.NoError(t, err)
		c.agents = append(c.agents, a)
		c.cni = append(c.cni, node)
		c.logs = append(c.logs, logs)
	}
	ctx, cancel := context.WithCancel(context.Background())
	g, gctx := errgroup.WithContext(ctx)
	for _, a := range c.agents {
		g.Go(func() error { return a.Run(gctx) })
	}
	t.Cleanup(func() {
		cancel()
		require.NoError(t, g.Wait())
	})
	deadline := time.Now().Add(60 * time.Second)
	for i, a := range c.agents {
		for !a.State().Ready || a.State().Peers < n-1 {
			require.True(t, time.Now().Before(deadline), "node %d: not ready with %d peers: %+v\n%s", i, n-1, a.State(), c.logs[i])
			time.Sleep(20 * time.Millisecond)
		}
	}
	return c
}

// subnet is node i's IPv4 and IPv6 subnets.
func (c *cluster) subnet(i int) (netip.Prefix, netip.Prefix) {
	l := c.agents[i].State().Lease
	return l.Subnet, l.IPv6Subnet
}

// hostLocalIPs lists the addresses host-local holds in node i's store.
func (c *cluster) hostLocalIPs(t *testing.T, i int) []string {
	t.Helper()
	dir := c.cni[i].Path(filepath.Join(cnilab.HostLocalDir, "cbr0"))
	entries, err := os.ReadDir(dir)
	if os.IsNotExist(err) {
		return nil
	}
	require.NoError(t, err)
	var ips []string
	for _, e := range entries {
		if _, err := netip.ParseAddr(e.Name()); err == nil {
			ips = append(ips, e.Name())
		}
	}
	return ips
}

// storedConfs lists the flannel plugin's stored configs on node i.
func (c *cluster) storedConfs(t *testing.T, i int) []string {
	t.Helper()
	entries, err := os.ReadDir(c.cni[i].Path(cnilab.FlannelDataDir))
	if os.IsNotExist(err) {
		return nil
	}
	require.NoError(t, err)
	var out []string
	for _, e := range entries {
		out = append(out, e.Name())
	}
	return out
}

// veths lists the pod veths in node i's namespace (not the underlay).
func (c *cluster) veths(t *testing.T, i int) []string {
	t.Helper()
	links, err := nlsafe.Wrap(c.lab.Nodes[i].Handle).LinkList()
	require.NoError(t, err)
	var out []string
	for _, l := range links {
		if l.Type() == "veth" && l.Attrs().Name != netlab.UnderlayIface {
			out = append(out, l.Attrs().Name)
		}
	}
	return out
}

func checkPair(ctx context.Context, from, to *netlab.Pod) error {
	for _, dst := range []netip.Addr{to.IP, to.IPv6} {
		if !dst.IsValid() {
			continue
		}
		if err := from.Ping(ctx, dst); err != nil {
			return fmt.Errorf("icmp %s -> %s: %w", from.Name, dst, err)
		}
		if err := from.TCPCheck(ctx, to, dst); err != nil {
			return fmt.Errorf("tcp %s -> %s: %w", from.Name, dst, err)
		}
	}
	return nil
}

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}
