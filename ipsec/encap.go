package ipsec

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/internal/nlsafe"
)

// openEncapSocket opens a UDP socket on port 4500 in ns with UDP_ENCAP set,
// which the kernel needs to hand ESP-in-UDP packets to XFRM. The returned
// func closes it.
func openEncapSocket(ns netns.NsHandle) (func(), error) {
	if !ns.IsOpen() {
		return nil, errors.New("no namespace handle for the udp encapsulation socket")
	}
	var fd int
	err := nlsafe.InNamespace(ns, func() error {
		var err error
		fd, err = unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		if err := unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_REUSEADDR, 1); err != nil {
			unix.Close(fd)
			return err
		}
		if err := unix.Bind(fd, &unix.SockaddrInet4{Port: UDPEncapPort}); err != nil {
			unix.Close(fd)
			return err
		}
		if err := unix.SetsockoptInt(fd, unix.IPPROTO_UDP, unix.UDP_ENCAP, unix.UDP_ENCAP_ESPINUDP); err != nil {
			unix.Close(fd)
			return err
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("udp encapsulation socket on port %d: %w", UDPEncapPort, err)
	}
	return func() { unix.Close(fd) }, nil
}
