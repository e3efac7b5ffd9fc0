package cni_test

import (
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sync/errgroup"

	"github.com/flannelkit/flannel/internal/cnilab"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

// TestConcurrentAddDel: 50 pods added at once on one node through libcni
// with upstream's conflist, each with its own address in the node's
// subnet, a default route via the bridge, a route to the cluster network
// and the MTU flanneld wrote; then deleted at once, which frees every
// address and veth; a second DEL succeeds.
func TestConcurrentAddDel(t *testing.T) {
	c := newCluster(t, 1, "vxlan", false)
	nd, rt := c.lab.Nodes[0], c.cni[0]
	subnet, _ := c.subnet(0)
	mtu := c.agents[0].State().MTU
	gw := subnet.Addr().Next()

	const n = 50
	pods := make([]*netlab.Pod, n)
	g := errgroup.Group{}
	for i := range n {
		g.Go(func() error {
			p, _, err := rt.AddPod(ctxT(t, 2*time.Minute), nd, fmt.Sprintf("p%d", i))
			pods[i] = p
			return err
		})
	}
	require.NoError(t, g.Wait())

	seen := map[netip.Addr]string{}
	for _, p := range pods {
		require.True(t, subnet.Contains(p.IP), "pod %s got %s outside %s", p.Name, p.IP, subnet)
		require.NotEqual(t, gw, p.IP)
		if other, dup := seen[p.IP]; dup {
			t.Fatalf("pods %s and %s both got %s", other, p.Name, p.IP)
		}
		seen[p.IP] = p.Name
		eth, err := p.Handle.LinkByName(cnilab.IfName)
		require.NoError(t, err)
		assert.Equal(t, mtu, eth.Attrs().MTU, "pod %s MTU", p.Name)
		routes, err := nlsafe.Wrap(p.Handle).RouteList(eth, netlink.FAMILY_V4)
		require.NoError(t, err)
		var dflt, cluster bool
		for _, r := range routes {
			if r.Dst == nil || r.Dst.String() == "0.0.0.0/0" {
				dflt = dflt || r.Gw.Equal(gw.AsSlice())
			}
			if r.Dst != nil && r.Dst.String() == c.cfg.Network.String() {
				cluster = cluster || r.Gw.Equal(gw.AsSlice())
			}
		}
		assert.True(t, dflt, "pod %s: default route via %s: %v", p.Name, gw, routes)
		assert.True(t, cluster, "pod %s: route to %s via %s: %v", p.Name, c.cfg.Network, gw, routes)
	}
	assert.Len(t, c.hostLocalIPs(t, 0), n)
	assert.Len(t, c.storedConfs(t, 0), n)
	assert.Len(t, c.veths(t, 0), n)
	require.NoError(t, pods[0].Ping(ctxT(t, 10*time.Second), pods[n-1].IP), "pods on one bridge")
	require.NoError(t, pods[0].Ping(ctxT(t, 10*time.Second), gw), "pod to its gateway")

	// The stored configs are the rendered delegate, private to root.
	st, err := os.Stat(filepath.Join(rt.Path(cnilab.FlannelDataDir), cnilab.ContainerID(pods[0])))
	require.NoError(t, err)
	assert.Equal(t, os.FileMode(0o600), st.Mode().Perm())

	for _, p := range pods {
		g.Go(func() error {
			return rt.Del(ctxT(t, 2*time.Minute), cnilab.ContainerID(p), p.NSPath(), cnilab.IfName)
		})
	}
	require.NoError(t, g.Wait())
	assert.Empty(t, c.hostLocalIPs(t, 0), "host-local's store is empty after DEL")
	assert.Empty(t, c.storedConfs(t, 0))
	assert.Empty(t, c.veths(t, 0), "DEL removes the veths")
	for _, p := range pods[:5] {
		require.NoError(t, rt.DelPod(ctxT(t, time.Minute), p), "a second DEL succeeds")
	}
}

// TestPodsReachAcrossNodes: pods that got their addresses from the plugin
// reach pods on the other node over ICMP and TCP, on every family.
func TestPodsReachAcrossNodes(t *testing.T) {
	for _, tc := range []struct {
		backend string
		dual    bool
	}{{"vxlan", false}, {"vxlan", true}, {"host-gw", false}, {"host-gw", true}} {
		t.Run(fmt.Sprintf("%s/dual=%v", tc.backend, tc.dual), func(t *testing.T) {
			c := newCluster(t, 2, tc.backend, tc.dual)
			var pods []*netlab.Pod
			for i, nd := range c.lab.Nodes {
				p, res, err := c.cni[i].AddPod(ctxT(t, time.Minute), nd, "pod")
				require.NoError(t, err)
				v4, v6 := c.subnet(i)
				assert.True(t, v4.Contains(p.IP), "%s in %s", p.IP, v4)
				if tc.dual {
					assert.True(t, v6.Contains(p.IPv6), "%s in %s", p.IPv6, v6)
					assert.Len(t, res.IPs, 2)
				} else {
					assert.False(t, p.IPv6.IsValid())
				}
				pods = append(pods, p)
			}
			require.NoError(t, checkPair(ctxT(t, 30*time.Second), pods[0], pods[1]))
			require.NoError(t, checkPair(ctxT(t, 30*time.Second), pods[1], pods[0]))
		})
	}
}

// TestDelWithoutSubnetEnv: DEL needs only the stored config, so it frees
// the address even when flanneld is gone and subnet.env with it; it
// succeeds for a container that was never added.
func TestDelWithoutSubnetEnv(t *testing.T) {
	c := newCluster(t, 1, "host-gw", false)
	rt := c.cni[0]
	p, _, err := rt.AddPod(ctxT(t, time.Minute), c.lab.Nodes[0], "pod")
	require.NoError(t, err)
	require.Len(t, c.hostLocalIPs(t, 0), 1)
	require.NoError(t, os.Remove(rt.Path(cnilab.SubnetFile)))
	require.NoError(t, rt.Del(ctxT(t, time.Minute), cnilab.ContainerID(p), p.NSPath(), cnilab.IfName))
	assert.Empty(t, c.hostLocalIPs(t, 0))
	assert.Empty(t, c.veths(t, 0))
	require.NoError(t, rt.Del(ctxT(t, time.Minute), "never-added", "", cnilab.IfName))
}

// conflist100 is upstream's conflist at CNI 1.1.0, which has CHECK and
// STATUS.
const conflist110 = `{"name":"cbr0","cniVersion":"1.1.0","plugins":[
  {"type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}},
  {"type":"portmap","capabilities":{"portMappings":true}}]}`

// TestCheckAndStatus: CHECK passes for a pod as added and fails, naming
// the change, once the node's subnet is another one; STATUS reports
// whether subnet.env is there.
func TestCheckAndStatus(t *testing.T) {
	c := newCluster(t, 1, "host-gw", false)
	nd := c.lab.Nodes[0]
	rt := cnilab.NodeT(t, nd, cnilab.BinDirT(t), conflist110)
	env, err := os.ReadFile(c.cni[0].Path(cnilab.SubnetFile))
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(rt.Path(cnilab.SubnetFile), env, 0o644))
	require.NoError(t, rt.Status(ctxT(t, time.Minute)))

	p, res, err := rt.AddPod(ctxT(t, time.Minute), nd, "pod")
	require.NoError(t, err)
	assert.Equal(t, "1.1.0", res.CNIVersion)
	id := cnilab.ContainerID(p)
	require.NoError(t, rt.Check(ctxT(t, time.Minute), id, p.NSPath(), cnilab.IfName))

	moved := []byte("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.99.1/24\nFLANNEL_MTU=1500\nFLANNEL_IPMASQ=true\n")
	require.NoError(t, os.WriteFile(rt.Path(cnilab.SubnetFile), moved, 0o644))
	err = rt.Check(ctxT(t, time.Minute), id, p.NSPath(), cnilab.IfName)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "the node's subnet changed since the container was added")

	require.NoError(t, os.Remove(rt.Path(cnilab.SubnetFile)))
	err = rt.Status(ctxT(t, time.Minute))
	var te *types.Error
	require.ErrorAs(t, err, &te)
	assert.Equal(t, uint(types.ErrPluginNotAvailable), te.Code)
	assert.Contains(t, te.Msg, "flanneld is not ready yet")
	require.NoError(t, rt.DelPod(ctxT(t, time.Minute), p))
	assert.Empty(t, c.hostLocalIPs(t, 0))
}

// raw runs the built plugin binary as a runtime would, with CNI_* in the
// environment, on node rt.
func raw(t *testing.T, rt *cnilab.Node, bin, command, containerID, netns string, stdin []byte) ([]byte, error) {
	t.Helper()
	env := []string{
		"CNI_COMMAND=" + command, "CNI_CONTAINERID=" + containerID, "CNI_NETNS=" + netns,
		"CNI_IFNAME=" + cnilab.IfName, "CNI_PATH=" + bin, "PATH=" + os.Getenv("PATH"),
	}
	return rt.Run(ctxT(t, time.Minute), filepath.Join(bin, "flannel"), stdin, env)
}

// TestRawInvocation drives the binary through CNI_COMMAND directly:
// VERSION, ADD, CHECK with the prevResult, DEL twice.
func TestRawInvocation(t *testing.T) {
	c := newCluster(t, 1, "vxlan", false)
	nd, rt := c.lab.Nodes[0], c.cni[0]
	bin := cnilab.BinDirT(t)
	out, err := raw(t, rt, bin, "VERSION", "", "", []byte(`{"cniVersion":"1.0.0"}`))
	require.NoError(t, err)
	assert.JSONEq(t, `{"cniVersion":"1.1.0","supportedVersions":["0.3.0","0.3.1","0.4.0","1.0.0","1.1.0"]}`, string(out))

	p, err := nd.NewPodNS("raw")
	require.NoError(t, err)
	conf := []byte(`{"cniVersion":"1.0.0","name":"cbr0","type":"flannel","delegate":{"isDefaultGateway":true}}`)
	out, err = raw(t, rt, bin, "ADD", "raw-1", p.NSPath(), conf)
	require.NoError(t, err)
	res, err := current.NewResult(out)
	require.NoError(t, err)
	r := res.(*current.Result)
	v4, _, _ := cnilab.Addrs(r)
	subnet, _ := c.subnet(0)
	assert.True(t, subnet.Contains(v4), "%s in %s", v4, subnet)

	var withPrev map[string]any
	require.NoError(t, json.Unmarshal(conf, &withPrev))
	withPrev["prevResult"] = json.RawMessage(out)
	check, err := json.Marshal(withPrev)
	require.NoError(t, err)
	_, err = raw(t, rt, bin, "CHECK", "raw-1", p.NSPath(), check)
	require.NoError(t, err)
	for range 2 {
		_, err = raw(t, rt, bin, "DEL", "raw-1", p.NSPath(), conf)
		require.NoError(t, err)
	}
	assert.Empty(t, c.hostLocalIPs(t, 0))
	assert.Empty(t, c.storedConfs(t, 0))
}

// TestBadInput: each bad input is a CNI error with a code and a message,
// a non-zero exit, and leaves nothing behind: no interface in the pod, no
// veth on the node, no stored config, no address held.
func TestBadInput(t *testing.T) {
	c := newCluster(t, 1, "host-gw", false)
	nd := c.lab.Nodes[0]
	bin := cnilab.BinDirT(t)
	good := "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
	flannelConf := `{"cniVersion":"0.3.1","name":"cbr0","type":"flannel","delegate":{"isDefaultGateway":true}}`
	for i, tc := range []struct {
		name, conf, env string
		code            uint
		msg             string
	}{
		{"malformed config", `{"cniVersion":"0.3.1","name":"cbr0","type":"flannel",`, good, types.ErrDecodingFailure, "unexpected end of JSON input"},
		{"unknown cniVersion", `{"cniVersion":"9.9.9","name":"cbr0","type":"flannel"}`, good, types.ErrIncompatibleCNIVersion, "incompatible CNI versions"},
		{"cniVersion too old", `{"cniVersion":"0.2.0","name":"cbr0","type":"flannel"}`, good, types.ErrIncompatibleCNIVersion, "incompatible CNI versions"},
		{"delegate name", `{"cniVersion":"0.3.1","name":"cbr0","type":"flannel","delegate":{"name":"x"}}`, good, types.ErrInvalidNetworkConfig, "delegate.name is set"},
		{"delegate ipam", `{"cniVersion":"0.3.1","name":"cbr0","type":"flannel","delegate":{"ipam":{}}}`, good, types.ErrInvalidNetworkConfig, "delegate.ipam is set"},
		{"no subnet.env", flannelConf, "", types.ErrTryAgainLater, "subnet file /run/flannel/subnet.env does not exist: flanneld is not ready yet"},
		{"half-written subnet.env", flannelConf, "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.24", types.ErrTryAgainLater,
			"subnet file /run/flannel/subnet.env is incomplete or malformed, flanneld may not be ready yet"},
		{"subnet.env missing keys", flannelConf, "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\n", types.ErrTryAgainLater,
			"FLANNEL_MTU, FLANNEL_IPMASQ not set"},
		{"subnet.env outside its network", flannelConf, "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.99.7.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n", types.ErrInvalidNetworkConfig,
			"FLANNEL_SUBNET 10.99.7.1/24 is not inside FLANNEL_NETWORK 10.244.0.0/16"},
		{"delegate fails", `{"cniVersion":"0.3.1","name":"cbr0","type":"flannel","delegate":{"bridge":"a-bridge-name-far-too-long"}}`, good, 0,
			"flannel: delegate bridge ADD:"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rt := cnilab.NodeT(t, nd, bin, cnilab.Conflist)
			if tc.env != "" {
				require.NoError(t, os.WriteFile(rt.Path(cnilab.SubnetFile), []byte(tc.env), 0o644))
			}
			p, err := nd.NewPodNS(fmt.Sprintf("bad%d", i))
			require.NoError(t, err)
			out, err := raw(t, rt, bin, "ADD", "bad-"+fmt.Sprint(i), p.NSPath(), []byte(tc.conf))
			require.Error(t, err, "exit status non-zero; stdout %s", out)
			var te *types.Error
			require.ErrorAs(t, err, &te)
			if tc.code != 0 {
				assert.Equal(t, tc.code, te.Code, "code; msg %q", te.Msg)
			} else {
				assert.NotZero(t, te.Code)
			}
			assert.Contains(t, te.Msg+" "+te.Details, tc.msg)

			links, err := nlsafe.Wrap(p.Handle).LinkList()
			require.NoError(t, err)
			for _, l := range links {
				assert.Equal(t, "lo", l.Attrs().Name, "the pod has only lo")
			}
			assert.Empty(t, c.veths(t, 0), "no veth on the node")
			_, err = os.Stat(rt.Path(filepath.Join(cnilab.FlannelDataDir, "bad-"+fmt.Sprint(i))))
			assert.True(t, os.IsNotExist(err), "no stored config: %v", err)
			ips, _ := os.ReadDir(rt.Path(filepath.Join(cnilab.HostLocalDir, "cbr0")))
			for _, e := range ips {
				assert.Nil(t, net.ParseIP(e.Name()), "host-local holds %s", e.Name())
			}
			require.NoError(t, nd.DeletePod(p.Name))
		})
	}
}
