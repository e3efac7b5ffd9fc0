package ipip

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"syscall"

	"github.com/vishvananda/netlink"

	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

// ErrNoKernelSupport is wrapped when the kernel cannot create an ipip
// device: the ipip module is missing (or cannot be loaded here).
var ErrNoKernelSupport = errors.New("the kernel has no ipip support: load the ipip module (modprobe ipip)")

// mismatch names the first attribute of an existing ipip link that differs
// from what flannel.ipip must be, or returns "" when it can be kept.
func mismatch(l *netlink.Iptun, local netip.Addr) string {
	switch {
	case ipconv.AddrFromIP(l.Local) != local:
		return "local " + fmt.Sprint(l.Local)
	case l.Remote != nil && !l.Remote.IsUnspecified():
		return "remote " + l.Remote.String()
	}
	return ""
}

// ensureDevice makes flannel.ipip an ipip device with local, no remote,
// mtu, and up. A device of that name of another type is an error (it is
// not ours to delete, as upstream says); an ipip one with another local or
// a remote is recreated. It returns the link as the kernel reports it.
func ensureDevice(h *netlink.Handle, local netip.Addr, mtu int, log *slog.Logger) (*netlink.Iptun, error) {
	l, err := lookup(h)
	if err != nil {
		return nil, err
	}
	if l != nil {
		if why := mismatch(l, local); why != "" {
			log.Info("replacing device with mismatching attributes", "device", DeviceName, "mismatch", why)
			if err := h.LinkDel(l); err != nil && !errors.As(err, &netlink.LinkNotFoundError{}) {
				return nil, fmt.Errorf("delete mismatching device %s: %w", DeviceName, err)
			}
			l = nil
		}
	}
	if l == nil {
		dev := &netlink.Iptun{LinkAttrs: netlink.LinkAttrs{Name: DeviceName, MTU: mtu}, Local: ipconv.IPFromAddr(local)}
		err := h.LinkAdd(dev)
		switch {
		case errors.Is(err, syscall.EOPNOTSUPP) || errors.Is(err, syscall.ENOTSUP) || errors.Is(err, syscall.EAFNOSUPPORT):
			return nil, fmt.Errorf("create device %s: %w: %w", DeviceName, ErrNoKernelSupport, err)
		case err != nil && !errors.Is(err, syscall.EEXIST):
			return nil, fmt.Errorf("create device %s (local %s): %w", DeviceName, local, err)
		}
		// Re-read: on EEXIST someone raced us; check what is there.
		if l, err = lookup(h); err != nil {
			return nil, err
		}
		if l == nil || mismatch(l, local) != "" {
			return nil, fmt.Errorf("device %s: not the ipip device just created", DeviceName)
		}
		log.Info("device created", "device", DeviceName, "local", local, "mtu", mtu)
	}
	if l.MTU != mtu {
		if err := h.LinkSetMTU(l, mtu); err != nil {
			return nil, fmt.Errorf("set mtu %d on %s: %w", mtu, DeviceName, err)
		}
		l.MTU = mtu
	}
	if l.Flags&net.FlagUp == 0 {
		if err := h.LinkSetUp(l); err != nil {
			return nil, fmt.Errorf("set %s up: %w", DeviceName, err)
		}
	}
	return l, nil
}

// lookup returns flannel.ipip, nil when there is none; a device of that
// name that is not ipip is an error.
func lookup(h *netlink.Handle) (*netlink.Iptun, error) {
	l, err := h.LinkByName(DeviceName)
	var nf netlink.LinkNotFoundError
	switch {
	case errors.As(err, &nf):
		return nil, nil
	case err != nil:
		return nil, fmt.Errorf("look up device %s: %w", DeviceName, err)
	}
	t, ok := l.(*netlink.Iptun)
	if !ok || l.Type() != "ipip" {
		return nil, fmt.Errorf("device %s exists and is not an ipip device (type %s): remove it and try again", DeviceName, l.Type())
	}
	return t, nil
}

// ensureAddr gives link exactly the address addr/32 (IPv4; other IPv4
// addresses are removed): /32 so that no subnet or broadcast route is
// created, as upstream does.
func ensureAddr(h *netlink.Handle, link netlink.Link, addr netip.Addr) error {
	have, err := nlsafe.Wrap(h).AddrList(link, netlink.FAMILY_V4)
	if err != nil {
		return err
	}
	want := netip.PrefixFrom(addr, 32)
	found := false
	for _, a := range have {
		p, _ := ipconv.PrefixFromIPNet(a.IPNet)
		if p == want {
			found = true
			continue
		}
		if err := h.AddrDel(link, &a); err != nil && !errors.Is(err, syscall.EADDRNOTAVAIL) {
			return fmt.Errorf("delete address %s from %s: %w", a.IPNet, DeviceName, err)
		}
	}
	if found {
		return nil
	}
	a := &netlink.Addr{IPNet: ipconv.IPNetFromPrefix(want)}
	if err := h.AddrReplace(link, a); err != nil {
		return fmt.Errorf("add address %s to %s: %w", want, DeviceName, err)
	}
	return nil
}
