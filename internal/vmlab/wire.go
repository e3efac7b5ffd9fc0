package vmlab

import (
	"bytes"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

// Tap hands every frame on the wire between the lab's nodes (all ports of
// segment 0's bridge, through an AF_PACKET socket in its namespace) to
// frame, one call at a time, until the returned stop is called (also at
// t's cleanup; stop may be called more than once); stop hands over the
// frames still queued before it returns. A capture on a node's
// own interface would also see the inner packets a tunnel re-injects
// there after decapsulation.
func Tap(t *testing.T, lab *netlab.Lab, frame func(f []byte)) (stop func()) {
	t.Helper()
	seg, err := netns.GetFromName(lab.NSName("s0"))
	require.NoError(t, err)
	defer seg.Close()
	var fd int
	require.NoError(t, nlsafe.InNamespace(seg, func() error {
		var err error
		// ETH_P_ALL: a socket for one protocol never sees frames that a
		// bridge port consumes.
		fd, err = unix.Socket(unix.AF_PACKET, unix.SOCK_RAW|unix.SOCK_CLOEXEC, int(Htons(unix.ETH_P_ALL)))
		return err
	}))
	require.NoError(t, unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, unix.SO_RCVTIMEO, &unix.Timeval{Usec: 100000}))
	var done atomic.Bool
	var wg sync.WaitGroup
	wg.Go(func() {
		buf := make([]byte, 65536)
		for !done.Load() {
			n, _, err := unix.Recvfrom(fd, buf, 0)
			if err == nil && n > 0 {
				frame(buf[:n])
			}
		}
	})
	var once sync.Once
	stop = func() {
		once.Do(func() {
			done.Store(true)
			wg.Wait()
			// Frames the reader had not got to yet (a loaded machine
			// schedules it late) are counted too: what was on the wire
			// before stop is in the socket's queue.
			buf := make([]byte, 65536)
			for {
				n, _, err := unix.Recvfrom(fd, buf, unix.MSG_DONTWAIT)
				if err != nil || n <= 0 {
					break
				}
				frame(buf[:n])
			}
			unix.Close(fd)
		})
	}
	t.Cleanup(stop)
	return stop
}

// Htons converts v to network byte order (for AF_PACKET protocols).
func Htons(v uint16) uint16 { return v<<8 | v>>8 }

// UDPEchoSized sends UDP datagrams of size bytes with DF set from pod a to
// an echo server in pod b (IPv4) until one comes back, for up to within.
func UDPEchoSized(t *testing.T, a, b *netlab.Pod, size int, within time.Duration) error {
	t.Helper()
	var srv, cli *net.UDPConn
	require.NoError(t, nlsafe.InNamespace(b.NS, func() error {
		var err error
		srv, err = net.ListenUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(b.IP, 0)))
		return err
	}))
	defer srv.Close()
	require.NoError(t, nlsafe.InNamespace(a.NS, func() error {
		var err error
		cli, err = net.DialUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(a.IP, 0)), srv.LocalAddr().(*net.UDPAddr))
		return err
	}))
	defer cli.Close()
	raw, err := cli.SyscallConn()
	require.NoError(t, err)
	require.NoError(t, raw.Control(func(fd uintptr) {
		err = unix.SetsockoptInt(int(fd), unix.IPPROTO_IP, unix.IP_MTU_DISCOVER, unix.IP_PMTUDISC_DO)
	}))
	require.NoError(t, err)
	var wg sync.WaitGroup
	defer wg.Wait()
	wg.Go(func() {
		buf := make([]byte, 65536)
		n, from, err := srv.ReadFromUDPAddrPort(buf)
		if err == nil {
			srv.WriteToUDPAddrPort(buf[:n], from)
		}
	})
	payload := bytes.Repeat([]byte{0xa5}, size)
	buf := make([]byte, 65536)
	for deadline := time.Now().Add(within); time.Now().Before(deadline); {
		if _, err := cli.Write(payload); err != nil {
			srv.Close()
			return fmt.Errorf("send %d bytes: %w", size, err)
		}
		cli.SetReadDeadline(time.Now().Add(time.Second))
		if n, err := cli.Read(buf); err == nil && n == size {
			return nil
		}
	}
	srv.Close()
	return fmt.Errorf("no echo of %d bytes", size)
}
