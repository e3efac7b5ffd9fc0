package wireguard

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

// ErrNoWireGuard is wrapped by the errors of Prepare and CheckKernel when
// the kernel cannot create WireGuard devices.
var ErrNoWireGuard = errors.New("kernel lacks WireGuard (module wireguard needed: modprobe wireguard, or a kernel of 5.6 or later with CONFIG_WIREGUARD)")

// noWireGuard reports whether err from creating a wireguard link means the
// kernel has no such link type (the module is absent and could not be
// loaded).
func noWireGuard(err error) bool {
	return errors.Is(err, syscall.EOPNOTSUPP)
}

// ensureLink makes the device s.name a WireGuard link with s.mtu, up. An
// existing WireGuard link is kept as it is (its key, port and peers: a
// restart changes nothing); a link of another type with the name is
// replaced.
func ensureLink(h *netlink.Handle, s devSpec, log *slog.Logger) (netlink.Link, error) {
	link, err := h.LinkByName(s.name)
	var nf netlink.LinkNotFoundError
	switch {
	case errors.As(err, &nf):
		link = nil
	case err != nil:
		return nil, fmt.Errorf("look up device %s: %w", s.name, err)
	}
	if link != nil && link.Type() != "wireguard" {
		log.Warn("replacing a device of another type with our name", "device", s.name, "type", link.Type())
		if err := h.LinkDel(link); err != nil && !errors.As(err, &nf) {
			return nil, fmt.Errorf("delete device %s of type %s: %w", s.name, link.Type(), err)
		}
		link = nil
	}
	if link == nil {
		err := h.LinkAdd(&netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: s.name, MTU: s.mtu}})
		switch {
		case err != nil && noWireGuard(err):
			return nil, fmt.Errorf("%w: create device %s: %v", ErrNoWireGuard, s.name, err)
		case err != nil && !errors.Is(err, syscall.EEXIST):
			return nil, fmt.Errorf("create device %s: %w", s.name, err)
		}
		if link, err = h.LinkByName(s.name); err != nil {
			return nil, fmt.Errorf("look up created device %s: %w", s.name, err)
		}
	}
	if link.Attrs().MTU != s.mtu {
		if err := h.LinkSetMTU(link, s.mtu); err != nil {
			return nil, fmt.Errorf("set mtu %d on %s: %w", s.mtu, s.name, err)
		}
	}
	if link.Attrs().Flags&net.FlagUp == 0 {
		if err := h.LinkSetUp(link); err != nil {
			return nil, fmt.Errorf("set %s up: %w", s.name, err)
		}
	}
	return link, nil
}

// ensureAddrs makes want the addresses of link: missing ones are added,
// others (a previous lease's) deleted, IPv6 link-local ones left alone.
func ensureAddrs(h *netlink.Handle, link netlink.Link, want []netip.Prefix) error {
	have, err := nlsafe.Wrap(h).AddrList(link, netlink.FAMILY_ALL)
	if err != nil {
		return err
	}
	wanted := map[netip.Prefix]bool{}
	for _, p := range want {
		wanted[p] = true
	}
	present := map[netip.Prefix]bool{}
	var errs []error
	for _, a := range have {
		p, ok := ipconv.PrefixFromIPNet(a.IPNet)
		if !ok || p.Addr().IsLinkLocalUnicast() {
			continue
		}
		p = netip.PrefixFrom(ipconv.AddrFromIP(a.IP), p.Bits())
		if wanted[p] {
			present[p] = true
			continue
		}
		if err := h.AddrDel(link, &a); err != nil && !errors.Is(err, syscall.EADDRNOTAVAIL) {
			errs = append(errs, fmt.Errorf("delete address %s from %s: %w", p, link.Attrs().Name, err))
		}
	}
	for _, p := range want {
		if present[p] {
			continue
		}
		a := &netlink.Addr{IPNet: &net.IPNet{IP: ipconv.IPFromAddr(p.Addr()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
		if err := h.AddrAdd(link, a); err != nil && !errors.Is(err, syscall.EEXIST) {
			errs = append(errs, fmt.Errorf("add address %s to %s: %w", p, link.Attrs().Name, err))
		}
	}
	return errors.Join(errs...)
}

// withClient runs fn with a wgctrl client whose netlink socket lives in
// ns: wgctrl's sockets belong to the namespace of the thread that opens
// them, so it is opened on a thread switched into ns (nlsafe.InNamespace)
// and used there. The client is closed when fn returns.
func withClient(ns netns.NsHandle, fn func(c *wgctrl.Client) error) error {
	return nlsafe.InNamespace(ns, func() error {
		c, err := wgctrl.New()
		if err != nil {
			return fmt.Errorf("wgctrl: %w", err)
		}
		defer c.Close()
		return fn(c)
	})
}

// deviceState reads device name; a device the kernel's WireGuard does not
// know (no generic netlink family: no module) wraps ErrNoWireGuard.
func deviceState(c *wgctrl.Client, name string) (*wgtypes.Device, error) {
	d, err := c.Device(name)
	if errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: device %s not known to wgctrl", ErrNoWireGuard, name)
	}
	if err != nil {
		return nil, fmt.Errorf("read wireguard device %s: %w", name, err)
	}
	return d, nil
}

// configureIdentity sets the private key and listen port of device d when
// they differ (setting them resets every peer's session).
func configureIdentity(c *wgctrl.Client, d *wgtypes.Device, key wgtypes.Key, port int) error {
	if d.PrivateKey == key && d.ListenPort == port {
		return nil
	}
	cfg := wgtypes.Config{PrivateKey: &key, ListenPort: &port}
	if err := c.ConfigureDevice(d.Name, cfg); err != nil {
		return fmt.Errorf("set key and listen port %d of %s: %w", port, d.Name, err)
	}
	return nil
}
