package dockerhost

import (
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netns"

	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/internal/testenv"
)

// bins are the flanneld and whoami binaries TestMain builds once.
var bins struct{ flanneld, whoami string }

func TestMain(m *testing.M) { os.Exit(buildAndRun(m)) }

func buildAndRun(m *testing.M) int {
	dir, err := os.MkdirTemp("", "dockerhost-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if os.Getenv(sweepChild) != "" { // TestSweep's child: built already
		bins.flanneld, bins.whoami = os.Getenv("DOCKERHOST_FLANNELD"), os.Getenv("DOCKERHOST_WHOAMI")
		return m.Run()
	}
	gobin := testenv.GoBinary()
	bins.flanneld, bins.whoami = filepath.Join(dir, "flanneld"), filepath.Join(dir, "whoami")
	for pkg, out := range map[string]string{"../../examples/flanneld": bins.flanneld, "./whoami": bins.whoami} {
		cmd := exec.Command(gobin, "build", "-ldflags=-s -w", "-o", out, pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if b, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "build %s: %v\n%s", pkg, err, b)
			return 1
		}
	}
	return m.Run()
}

const whoamiPort = "5000"

func newCluster(t *testing.T, hosts int, backendType string) *Cluster {
	return NewT(t, Options{
		Hosts: hosts, Flanneld: bins.flanneld,
		Network: fmt.Sprintf(`{"Network":"10.244.0.0/16","Backend":{"Type":%q}}`, backendType),
		Files:   map[string]string{"/bin/whoami": bins.whoami},
	})
}

// TestCrossHost: containers on different hosts reach each other by IP
// (ping, TCP, unmasqueraded), docker0 has the host's flannel subnet and
// MTU, and a container reaches the underlay's router through its host,
// masqueraded by flanneld (Docker's own masquerade is off).
func TestCrossHost(t *testing.T) {
	for _, tc := range []struct {
		backend string
		hosts   int
		mtu     int
	}{{"vxlan", 3, 1450}, {"host-gw", 2, 1500}} {
		t.Run(tc.backend, func(t *testing.T) {
			ctx := t.Context()
			c := newCluster(t, tc.hosts, tc.backend)
			require.NoError(t, c.Start(ctx))
			ips := make([]netip.Addr, len(c.Hosts))
			for i, h := range c.Hosts {
				env, err := h.SubnetEnv()
				require.NoError(t, err)
				assert.Equal(t, tc.mtu, env.MTU)
				args, err := h.DockerdArgs()
				require.NoError(t, err)
				assert.Equal(t, []string{"--bip=" + env.Subnet.String(), "--ip-masq=false", fmt.Sprintf("--mtu=%d", env.MTU)}, args[:3])
				ips[i], err = h.Run(ctx, fmt.Sprintf("c%d", i), "/bin/whoami", whoamiPort)
				require.NoError(t, err)
				assert.True(t, env.Subnet.Masked().Contains(ips[i]), "container %s in %s", ips[i], env.Subnet)
				// A Linux bridge takes the smallest MTU of its ports and
				// Docker gives --mtu to the containers' veths: docker0 has
				// FLANNEL_MTU from its first container on.
				checkBridge(t, h, env.Subnet, env.MTU)
				out, err := h.Docker(ctx, "exec", fmt.Sprintf("c%d", i), "cat", "/sys/class/net/eth0/mtu")
				require.NoError(t, err)
				assert.Equal(t, strconv.Itoa(env.MTU), out, "container eth0 mtu")
			}
			for i, h := range c.Hosts {
				for j := range c.Hosts {
					if i == j {
						continue
					}
					out, err := h.Docker(ctx, "exec", fmt.Sprintf("c%d", i), "ping", "-c", "3", "-i", "0.2", "-W", "2", ips[j].String())
					require.NoError(t, err, "ping %s -> %s", ips[i], ips[j])
					assert.Contains(t, out, "3 packets received")
					assert.Equal(t, ips[i].String(), tcpWhoami(t, h, fmt.Sprintf("c%d", i), ips[j].String()),
						"the peer container sees the container's own address")
				}
			}
			// flanneld turned IPv4 forwarding on before dockerd started,
			// so Docker left FORWARD's policy alone; had Docker turned it
			// on itself (or a firewall), the policy would be DROP. With
			// DROP, flanneld's FLANNEL-FWD rules carry the traffic.
			for _, h := range c.Hosts {
				_, err := h.Exec(ctx, "iptables", "-P", "FORWARD", "DROP")
				require.NoError(t, err)
				rules, err := h.Exec(ctx, "iptables", "-S", "FORWARD")
				require.NoError(t, err)
				assert.Contains(t, rules, "-j FLANNEL-FWD")
			}
			_, err := c.Hosts[0].Docker(ctx, "exec", "c0", "ping", "-c", "2", "-W", "2", ips[1].String())
			require.NoError(t, err, "ping with FORWARD policy DROP")
			assert.Equal(t, ips[1].String(), tcpWhoami(t, c.Hosts[1], "c1", ips[0].String()))
			checkMasquerade(t, c)
		})
	}
}

// checkBridge: docker0 in the host's namespace has FLANNEL_SUBNET and
// FLANNEL_MTU.
func checkBridge(t *testing.T, h *Host, subnet netip.Prefix, mtu int) {
	t.Helper()
	link, err := h.Lab.Handle.LinkByName("docker0")
	require.NoError(t, err)
	assert.Equal(t, mtu, link.Attrs().MTU, "docker0 mtu")
	addrs, err := nlsafe.Wrap(h.Lab.Handle).AddrList(link, syscall.AF_INET)
	require.NoError(t, err)
	require.Len(t, addrs, 1)
	got, _ := netip.AddrFromSlice(addrs[0].IP.To4())
	ones, _ := addrs[0].Mask.Size()
	assert.Equal(t, subnet, netip.PrefixFrom(got, ones), "docker0 address")
}

// tcpWhoami connects from container to whoami at ip and returns what it
// answers: the source address it saw.
func tcpWhoami(t *testing.T, h *Host, container, ip string) string {
	t.Helper()
	out, err := h.Docker(t.Context(), "exec", container, "nc", "-w", "5", ip, whoamiPort)
	require.NoError(t, err)
	return strings.TrimSpace(out)
}

// checkMasquerade: a container on each host connects to a listener in
// the router namespace (outside the flannel network, with no route to
// it); the listener sees the host's underlay address.
func checkMasquerade(t *testing.T, c *Cluster) {
	t.Helper()
	rt, err := netns.GetFromName(c.Lab.NSName("rt"))
	require.NoError(t, err)
	defer rt.Close()
	var ln net.Listener
	require.NoError(t, nlsafe.InNamespace(rt, func() error {
		ln, err = net.Listen("tcp", netip.AddrPortFrom(netlab.RouterIP(0), 0).String())
		return err
	}))
	defer ln.Close()
	seen := make(chan string, 1)
	go func() {
		conn, err := ln.Accept()
		if err != nil {
			return
		}
		defer conn.Close()
		host, _, _ := net.SplitHostPort(conn.RemoteAddr().String())
		fmt.Fprintln(conn, host)
		seen <- host
	}()
	_, port, _ := net.SplitHostPort(ln.Addr().String())
	h := c.Hosts[0]
	out, err := h.Docker(t.Context(), "exec", "c0", "nc", "-w", "5", netlab.RouterIP(0).String(), port)
	require.NoError(t, err)
	assert.Equal(t, h.Lab.IP.String(), strings.TrimSpace(out), "the router sees the host's address")
	select {
	case got := <-seen:
		assert.Equal(t, h.Lab.IP.String(), got)
	case <-time.After(10 * time.Second):
		t.Fatal("no connection at the router")
	}
}
