package vxlan

import (
	"fmt"
	"unsafe"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/internal/nlsafe"
)

// ethtoolValue is struct ethtool_value.
type ethtoolValue struct {
	cmd  uint32
	data uint32
}

// ifreqData is struct ifreq with the ifr_data member.
type ifreqData struct {
	name [unix.IFNAMSIZ]byte
	data unsafe.Pointer
	_    [24 - unsafe.Sizeof(uintptr(0))]byte
}

// ethtool runs one ETHTOOL_G*/S* value command on dev in ns and returns the
// value the kernel reports.
func ethtool(ns netns.NsHandle, dev string, cmd, value uint32) (uint32, error) {
	v := ethtoolValue{cmd: cmd, data: value}
	err := nlsafe.InNamespace(ns, func() error {
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		var ifr ifreqData
		copy(ifr.name[:unix.IFNAMSIZ-1], dev)
		ifr.data = unsafe.Pointer(&v)
		_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), unix.SIOCETHTOOL, uintptr(unsafe.Pointer(&ifr)))
		if errno != 0 {
			return errno
		}
		return nil
	})
	if err != nil {
		return 0, fmt.Errorf("ethtool command %#x on %s: %w", cmd, dev, err)
	}
	return v.data, nil
}

// txChecksum reports whether TX checksum offload is on for dev.
func txChecksum(ns netns.NsHandle, dev string) (bool, error) {
	v, err := ethtool(ns, dev, unix.ETHTOOL_GTXCSUM, 0)
	return v != 0, err
}

// disableTXChecksum turns TX checksum offload off on dev (ethtool -K dev tx
// off), the workaround for kernels that corrupt VXLAN checksums under NAT.
func disableTXChecksum(ns netns.NsHandle, dev string) error {
	on, err := txChecksum(ns, dev)
	if err != nil || !on {
		return err
	}
	_, err = ethtool(ns, dev, unix.ETHTOOL_STXCSUM, 0)
	return err
}
