package ipsec_test

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/internal/vmlab"
	"github.com/flannelkit/flannel/ipsec"
)

// udpSink is a UDP listener in a pod that records the payloads it got.
type udpSink struct {
	port int
	mu   sync.Mutex
	got  map[string]bool
}

func startUDPSink(t *testing.T, p *netlab.Pod) *udpSink {
	t.Helper()
	var conn *net.UDPConn
	require.NoError(t, nlsafe.InNamespace(p.NS, func() error {
		var err error
		conn, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(netip.IPv4Unspecified(), 0)))
		return err
	}))
	s := &udpSink{port: conn.LocalAddr().(*net.UDPAddr).Port, got: map[string]bool{}}
	var wg sync.WaitGroup
	wg.Go(func() {
		buf := make([]byte, 2048)
		for {
			n, err := conn.Read(buf)
			if err != nil {
				return
			}
			s.mu.Lock()
			s.got[string(buf[:n])] = true
			s.mu.Unlock()
		}
	})
	t.Cleanup(func() { conn.Close(); wg.Wait() })
	return s
}

func (s *udpSink) has(payload string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.got[payload]
}

// injectUDP puts an IPv4/UDP frame from src to dst on the wire of node
// from's underlay interface, addressed to the MAC of node to's: a packet
// socket, so neither the IP stack nor XFRM of node from sees it (a
// spoofing host on the underlay).
func injectUDP(t *testing.T, from, to *netlab.Node, src, dst netip.Addr, port int, payload string) {
	t.Helper()
	out, err := from.Handle.LinkByName(from.Iface)
	require.NoError(t, err)
	in, err := to.Handle.LinkByName(to.Iface)
	require.NoError(t, err)
	udp := make([]byte, 8+len(payload))
	binary.BigEndian.PutUint16(udp[0:], 40000)
	binary.BigEndian.PutUint16(udp[2:], uint16(port))
	binary.BigEndian.PutUint16(udp[4:], uint16(len(udp)))
	copy(udp[8:], payload) // checksum 0: none (IPv4)
	ip := make([]byte, 20, 20+len(udp))
	ip[0], ip[8], ip[9] = 0x45, 64, unix.IPPROTO_UDP
	binary.BigEndian.PutUint16(ip[2:], uint16(20+len(udp)))
	s4, d4 := src.As4(), dst.As4()
	copy(ip[12:], s4[:])
	copy(ip[16:], d4[:])
	var sum uint32
	for i := 0; i < 20; i += 2 {
		sum += uint32(binary.BigEndian.Uint16(ip[i:]))
	}
	for sum > 0xffff {
		sum = sum&0xffff + sum>>16
	}
	binary.BigEndian.PutUint16(ip[10:], ^uint16(sum))
	frame := append(append(append(append([]byte{}, in.Attrs().HardwareAddr...), out.Attrs().HardwareAddr...), 0x08, 0x00), append(ip, udp...)...)
	require.NoError(t, nlsafe.InNamespace(from.NS, func() error {
		fd, err := unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		return unix.Sendto(fd, frame, 0, &unix.SockaddrLinklayer{Ifindex: out.Attrs().Index, Protocol: vmlab.Htons(unix.ETH_P_IP), Halen: 6})
	}))
}

// TestInVMInboundCleartextDropped: cleartext put on the underlay with a
// cluster source address (a peer's pod subnet, an address of the cluster
// network no node has) never reaches a local pod: not after Start, before
// the first Apply, and not after it. The same frame from a source outside
// the cluster network does arrive, so the frames do reach the node.
func TestInVMInboundCleartextDropped(t *testing.T) {
	inVM(t)
	c := newCluster(t, 3, func(int) string { return clusterPSK }, ipsec.Options{})
	n0, n1 := c.nodes[0].node, c.nodes[1].node
	sink := startUDPSink(t, c.nodes[1].pod)
	dst := c.nodes[1].pod.IP
	srcs := map[string]netip.Addr{
		"peer pod":           c.nodes[0].pod.IP,
		"unassigned cluster": netip.MustParseAddr("10.244.99.5"),
	}
	check := func(when string) {
		t.Helper()
		control := fmt.Sprintf("control %s", when)
		require.Eventually(t, func() bool {
			injectUDP(t, n0, n1, netip.MustParseAddr("192.0.2.77"), dst, sink.port, control)
			return sink.has(control)
		}, 20*time.Second, 200*time.Millisecond, "%s: a non-cluster source reaches the pod (the injection works)", when)
		for name, src := range srcs {
			payload := fmt.Sprintf("spoofed %s %s", name, when)
			for range 5 {
				injectUDP(t, n0, n1, src, dst, sink.port, payload)
			}
			// The control was sent after these on the same path: it
			// arriving means these had their chance.
			control2 := control + " after " + name
			require.Eventually(t, func() bool {
				injectUDP(t, n0, n1, netip.MustParseAddr("192.0.2.77"), dst, sink.port, control2)
				return sink.has(control2)
			}, 20*time.Second, 200*time.Millisecond)
			assert.False(t, sink.has(payload), "%s: cleartext from %s (%s) reached the pod", when, src, name)
		}
	}
	check("before the first Apply")
	c.applyOK()
	c.checkAllPairs()
	check("after Apply")
}

// TestInVMHostSourcedEncrypted: traffic from a node's host namespace to a
// remote pod (what kube-proxy's SNAT makes of NodePort traffic) leaves
// through ESP when its source is the node's public address, and is dropped
// from another host address: never in clear.
func TestInVMHostSourcedEncrypted(t *testing.T) {
	inVM(t)
	c := newCluster(t, 2, func(int) string { return clusterPSK }, ipsec.Options{})
	c.applyOK()
	c.checkAllPairs()
	n0 := c.nodes[0].node
	other := netip.MustParseAddr("192.0.2.10")
	lo, err := n0.Handle.LinkByName("lo")
	require.NoError(t, err)
	require.NoError(t, n0.Handle.AddrAdd(lo, &netlink.Addr{IPNet: &net.IPNet{IP: other.AsSlice(), Mask: net.CIDRMask(32, 32)}}))
	marker := fmt.Sprintf("PLAINTEXT-HOST-MARKER-%d", time.Now().UnixNano())
	capt := startCapture(t, c.lab, []byte(marker))
	sink := startUDPSink(t, c.nodes[1].pod)
	// send reports nil, or the EPERM of a block policy.
	send := func(src netip.Addr, payload string) error {
		t.Helper()
		return nlsafe.InNamespace(n0.NS, func() error {
			conn, err := net.DialUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(src, 0)),
				net.UDPAddrFromAddrPort(netip.AddrPortFrom(c.nodes[1].pod.IP, uint16(sink.port))))
			if err != nil {
				return err
			}
			defer conn.Close()
			_, err = conn.Write([]byte(payload))
			return err
		})
	}
	fromPublic := marker + " from the public address"
	require.Eventually(t, func() bool {
		return send(n0.IP, fromPublic) == nil && sink.has(fromPublic)
	}, 20*time.Second, 200*time.Millisecond, "host-sourced traffic from the public address reaches the remote pod")
	fromOther := marker + " from another address"
	for range 5 {
		err := send(other, fromOther)
		assert.ErrorIs(t, err, unix.EPERM, "the block policy refuses traffic from another host address")
	}
	require.Eventually(t, func() bool { // the path is idle again: what was sent is on the wire or gone
		return send(n0.IP, fromPublic+" again") == nil && sink.has(fromPublic+" again")
	}, 20*time.Second, 200*time.Millisecond)
	capt.stop()
	assert.False(t, sink.has(fromOther), "traffic from another host address is not covered by a peer policy: dropped")
	assert.Positive(t, capt.esp.Load(), "ESP on the wire")
	assert.Zero(t, capt.plain.Load(), "plain-text marker on the wire; first frame: %s", capt.first)
}
