package alloc_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/alloc"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/memstore"
)

func TestFromConfig(t *testing.T) {
	tests := []struct {
		name, typ, raw, wantErr string
	}{
		{name: "no backend object", typ: "alloc"},
		{name: "type only", typ: "alloc", raw: `{"Type":"alloc"}`},
		{name: "null", typ: "alloc", raw: `null`},
		{name: "unknown key named", typ: "alloc", raw: `{"Type":"alloc","DirectRouting":true}`, wantErr: "Backend.DirectRouting: unknown key"},
		{name: "other type", typ: "vxlan", raw: `{"Type":"vxlan"}`, wantErr: `Backend.Type "vxlan" is not "alloc"`},
		{name: "not an object", typ: "alloc", raw: `"x"`, wantErr: "Backend:"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b, err := alloc.FromConfig(lease.Config{BackendType: tc.typ, Backend: json.RawMessage(tc.raw)})
			if tc.wantErr != "" {
				assert.ErrorContains(t, err, tc.wantErr)
				assert.ErrorIs(t, err, lease.ErrInvalidConfig)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, "alloc", b.Type())
		})
	}
}

func TestParsedConfigBuildsAlloc(t *testing.T) {
	cfg, err := lease.ParseConfig([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"alloc"}}`))
	require.NoError(t, err)
	r := backend.NewRegistry()
	require.NoError(t, r.Register(alloc.Type, alloc.FromConfig))
	b, err := r.New(cfg)
	require.NoError(t, err)
	assert.Equal(t, alloc.Type, b.Type())
}

func TestStartPreconditions(t *testing.T) {
	b := alloc.New()
	_, err := b.Start(context.Background(), lease.Lease{})
	assert.ErrorContains(t, err, "Prepare was not called")
	_, err = b.Prepare(context.Background(), flannel.Env{})
	require.NoError(t, err)
	_, err = b.Start(context.Background(), lease.Lease{})
	assert.ErrorContains(t, err, "no subnet")
}

// kernelState renders what a backend could have programmed in a node's
// namespace: links (name, type, MTU, up), addresses, routes of every table,
// permanent neighbours, and the forwarding sysctls. What the kernel adds
// by itself while a fresh veth settles (carrier, IPv6 link-local addresses,
// their kernel routes, multicast neighbours) is left out: it is no
// backend's doing and comes at its own pace.
func kernelState(t *testing.T, n *netlab.Node) []string {
	t.Helper()
	var out []string
	links, err := nlsafe.Wrap(n.Handle).LinkList()
	require.NoError(t, err)
	for _, l := range links {
		a := l.Attrs()
		out = append(out, fmt.Sprintf("link %s %s mtu %d up %v", a.Name, l.Type(), a.MTU, a.Flags&net.FlagUp != 0))
	}
	addrs, err := nlsafe.Wrap(n.Handle).AddrList(nil, netlink.FAMILY_ALL)
	require.NoError(t, err)
	for _, a := range addrs {
		if !a.IP.IsLinkLocalUnicast() {
			out = append(out, fmt.Sprintf("addr %s dev %d", a.IPNet, a.LinkIndex))
		}
	}
	routes, err := nlsafe.Wrap(n.Handle).RouteListFiltered(netlink.FAMILY_ALL, &netlink.Route{Table: 0}, netlink.RT_FILTER_TABLE)
	require.NoError(t, err)
	for _, r := range routes {
		if r.Protocol != unix.RTPROT_KERNEL {
			out = append(out, "route "+backend.FormatRoute(r))
		}
	}
	neighs, err := nlsafe.Wrap(n.Handle).NeighList(0, netlink.FAMILY_ALL)
	require.NoError(t, err)
	for _, ne := range neighs {
		if ne.State&netlink.NUD_PERMANENT != 0 {
			out = append(out, fmt.Sprintf("neigh %s dev %d %s", ne.IP, ne.LinkIndex, ne.HardwareAddr))
		}
	}
	for _, s := range []string{"net/ipv4/ip_forward", "net/ipv6/conf/all/forwarding"} {
		v, err := nlsafe.GetSysctl(n.NS, s)
		require.NoError(t, err)
		out = append(out, s+"="+v)
	}
	slices.Sort(out)
	return out
}

// alloc does not run the dataplane contract suite (backendtest.Run): every
// case of it is about the kernel entries a backend owns (at least one per
// peer, repaired after damage, removed when stale, pods reaching each other
// through them), and alloc owns none. Its contract is that it makes no
// kernel entry at all, which TestAgentLeaseOnly checks on a whole run.

// TestAgentLeaseOnly runs real Agents with the alloc backend on two nodes of
// a netlab underlay, dual-stack: each gets a lease of its own with its
// public addresses and BackendType "alloc", writes a right subnet.env, sees
// the other as a peer, and leaves the kernel exactly as it found it.
func TestAgentLeaseOnly(t *testing.T) {
	testenv.RequireRoot(t)
	ignore := goleak.IgnoreCurrent()
	lab := netlab.NewT(t, netlab.Options{Nodes: 2, IPv4: true, IPv6: true})
	cfg, err := lease.ParseConfig([]byte(`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"alloc"}}`))
	require.NoError(t, err)
	store := memstore.New(cfg, memstore.Options{})
	before := make([][]string, len(lab.Nodes))
	for i, n := range lab.Nodes {
		before[i] = kernelState(t, n)
	}
	ctx, cancel := context.WithCancel(context.Background())
	dir := t.TempDir()
	agents := make([]*flannel.Agent, len(lab.Nodes))
	done := make(chan error, len(lab.Nodes))
	for i, n := range lab.Nodes {
		iface, err := backend.FindInterface(n.Handle, backend.InterfaceOptions{IPv4: true, IPv6: true})
		require.NoError(t, err)
		b, err := alloc.FromConfig(cfg)
		require.NoError(t, err)
		agents[i], err = flannel.NewAgent(flannel.AgentOptions{
			Store: store, Backend: b, Iface: iface, Handle: n.Handle, NS: n.NS,
			SubnetFile: filepath.Join(dir, n.Name, "subnet.env"), IPMasq: true,
		})
		require.NoError(t, err)
		go func(a *flannel.Agent) { done <- a.Run(ctx) }(agents[i])
	}
	for i, a := range agents {
		select {
		case <-a.Ready():
		case err := <-done:
			t.Fatalf("agent stopped before ready: %v", err)
		case <-time.After(time.Minute):
			t.Fatalf("agent %d not ready", i)
		}
	}
	require.Eventually(t, func() bool {
		return agents[0].State().Peers == 1 && agents[1].State().Peers == 1
	}, 30*time.Second, 20*time.Millisecond, "each agent sees the other")

	leases := store.Leases()
	require.Len(t, leases, 2)
	for i, n := range lab.Nodes {
		st := agents[i].State()
		own := st.Lease
		assert.True(t, cfg.Network.Contains(own.Subnet.Addr()), "subnet %s", own.Subnet)
		assert.Equal(t, cfg.SubnetLen, own.Subnet.Bits())
		assert.True(t, cfg.IPv6Network.Contains(own.IPv6Subnet.Addr()))
		assert.Equal(t, "alloc", own.Attrs.BackendType)
		assert.Equal(t, n.IP, own.Attrs.PublicIP)
		assert.Equal(t, n.IPv6, own.Attrs.PublicIPv6)
		assert.Equal(t, 1500, st.MTU)
		assert.Contains(t, leases, own)

		env, err := flannel.ReadSubnetEnv(filepath.Join(dir, n.Name, "subnet.env"))
		require.NoError(t, err)
		raw, err := os.ReadFile(filepath.Join(dir, n.Name, "subnet.env"))
		require.NoError(t, err)
		text := string(raw)
		assert.Contains(t, text, "FLANNEL_NETWORK=10.244.0.0/16\n")
		first := own.Subnet.Addr().Next()
		assert.Contains(t, text, fmt.Sprintf("FLANNEL_SUBNET=%s/%d\n", first, own.Subnet.Bits()))
		assert.Contains(t, text, "FLANNEL_MTU=1500\n")
		assert.Contains(t, text, "FLANNEL_IPMASQ=true\n")
		assert.True(t, strings.Contains(text, "FLANNEL_IPV6_SUBNET="), text)
		assert.Equal(t, own.Subnet, env.Lease().Subnet)
		assert.Equal(t, own.IPv6Subnet, env.Lease().IPv6Subnet)
	}
	assert.NotEqual(t, agents[0].State().Lease.Subnet, agents[1].State().Lease.Subnet)

	for i, n := range lab.Nodes {
		assert.Equal(t, before[i], kernelState(t, n), "%s: alloc made no kernel entry", n.Name)
	}
	cancel()
	for range agents {
		require.NoError(t, <-done)
	}
	for i, a := range agents {
		require.NoError(t, a.Cleanup(context.Background()))
		assert.Equal(t, before[i], kernelState(t, lab.Nodes[i]), "after cleanup")
	}
	goleak.VerifyNone(t, ignore)
}
