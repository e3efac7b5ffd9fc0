package wireguard_test

import (
	"fmt"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/internal/vmlab"
	"github.com/flannelkit/flannel/wireguard"
)

var clusterPods = []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("fd00:10:244::/56")}

// TestInVMMatrix: 3 nodes per family (IPv4, IPv6, dual-stack) and mode
// (separate, auto): every pod pair reaches every other over ICMP and TCP,
// and on the wire between the nodes only WireGuard UDP to the listen
// ports carries pod traffic, no pod packet or payload in clear.
func TestInVMMatrix(t *testing.T) {
	inVM(t)
	for _, tc := range []struct {
		fam  family
		mode wireguard.Mode
		mtu  int
		// wire: the WireGuard flows expected on the wire.
		wire []string
	}{
		{ipv4, wireguard.ModeSeparate, 1440, []string{"udp4:51820"}},
		{ipv6, wireguard.ModeSeparate, 1420, []string{"udp6:51821"}},
		{dual, wireguard.ModeSeparate, 1420, []string{"udp4:51820", "udp6:51821"}},
		{ipv4, wireguard.ModeAuto, 1440, []string{"udp4:51820"}},
		// No IPv4 to send to: the one device's port over IPv6.
		{ipv6, wireguard.ModeAuto, 1420, []string{"udp6:51820"}},
		// Both families through flannel-wg between the (private) IPv4
		// addresses, as upstream chooses.
		{dual, wireguard.ModeAuto, 1420, []string{"udp4:51820"}},
	} {
		t.Run(fmt.Sprintf("%s-%s", tc.fam, tc.mode), func(t *testing.T) {
			c := newCluster(t, 3, tc.fam, `"Mode":"`+string(tc.mode)+`"`, 0)
			marker := []byte("PLAINTEXT-MARKER-" + fmt.Sprint(time.Now().UnixNano()))
			capt := startCapture(t, c.lab, marker, clusterPods, 51820, 51821)
			c.applyOK()
			c.checkAllPairs()
			for i, a := range c.nodes {
				for j, b := range c.nodes {
					for _, ip := range []netip.Addr{b.pod.IP, b.pod.IPv6} {
						if i != j && ip.IsValid() {
							require.NoError(t, vmlab.SendMarker(t, a.pod, b.pod, ip, marker, 20*time.Second), "marker %d->%d %s", i, j, ip)
						}
					}
				}
			}
			capt.stop()
			t.Logf("wire: %s", capt.summary())
			assert.Zero(t, capt.plain.Load(), "pod packet in clear on the wire; first: %s", capt.first)
			for _, w := range tc.wire {
				assert.Positive(t, capt.wgCount(w), "WireGuard %s on the wire", w)
			}
			for _, w := range []string{"udp4:51820", "udp4:51821", "udp6:51820", "udp6:51821"} {
				if !contains(tc.wire, w) {
					assert.Zero(t, capt.wgCount(w), "no %s expected", w)
				}
			}
			for i, v := range c.nodes {
				assert.Equal(t, tc.mtu, v.net.MTU(), "node %d MTU", i)
				devs := []string{wireguard.DeviceName}
				if tc.mode == wireguard.ModeSeparate && !tc.fam.v4 {
					devs = []string{wireguard.DeviceNameV6}
				} else if tc.mode == wireguard.ModeSeparate && tc.fam.v6 {
					devs = append(devs, wireguard.DeviceNameV6)
				}
				for _, d := range devs {
					assert.Len(t, c.peerKeys(i, d), 2, "node %d %s peers", i, d)
				}
			}
			c.applyOK() // idempotent
			if tc.fam == ipv4 && tc.mode == wireguard.ModeSeparate {
				// A full-size packet with DF set fits one WireGuard packet
				// that fills the underlay MTU exactly.
				capt = startCapture(t, c.lab, marker, clusterPods, 51820)
				require.NoError(t, vmlab.UDPEchoSized(t, c.nodes[0].pod, c.nodes[1].pod, c.nodes[0].net.MTU()-28, 20*time.Second))
				capt.stop()
				assert.Equal(t, int64(1500), capt.maxWG4.Load(), "the overhead is exact")
				checkDevice(t, c)
			}
			c.checkLogsFree("")
		})
	}
}

func contains(s []string, x string) bool {
	for _, e := range s {
		if e == x {
			return true
		}
	}
	return false
}

// checkDevice checks node 0's flannel-wg: address, route, key, port and a
// peer as published by node 1.
func checkDevice(t *testing.T, c *wcluster) {
	v := c.nodes[0]
	link, err := v.node.Handle.LinkByName(wireguard.DeviceName)
	require.NoError(t, err)
	assert.Equal(t, 1440, link.Attrs().MTU)
	addrs, err := nlsafe.Wrap(v.node.Handle).AddrList(link, netlink.FAMILY_V4)
	require.NoError(t, err)
	require.Len(t, addrs, 1)
	assert.Equal(t, "10.244.1.0/32", addrs[0].IPNet.String(), "the subnet address, as upstream")
	routes, err := nlsafe.Wrap(v.node.Handle).RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{LinkIndex: link.Attrs().Index}, netlink.RT_FILTER_OIF)
	require.NoError(t, err)
	var dsts []string
	for _, r := range routes {
		if r.Protocol == backend.RouteProtocol {
			dsts = append(dsts, r.Dst.String())
		}
	}
	assert.Equal(t, []string{"10.244.0.0/16"}, dsts)
	d, err := wireguard.ReadDevice(v.node.NS, wireguard.DeviceName)
	require.NoError(t, err)
	assert.Equal(t, 51820, d.ListenPort)
	assert.Equal(t, v.net.PublicKey(), d.PublicKey.String())
	peer1 := c.nodes[1]
	for _, p := range d.Peers {
		if p.PublicKey.String() != peer1.net.PublicKey() {
			continue
		}
		assert.Equal(t, netip.AddrPortFrom(peer1.node.IP, 51820), p.Endpoint.AddrPort())
		require.Len(t, p.AllowedIPs, 1)
		assert.Equal(t, "10.244.2.0/24", p.AllowedIPs[0].String())
		return
	}
	t.Errorf("no peer for node 1 on node 0")
}
