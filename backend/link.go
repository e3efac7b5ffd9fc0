package backend

import (
	"errors"
	"fmt"

	"github.com/vishvananda/netlink"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
)

// ResolveLink finds the external interface's link through h: by index when
// set, else by name. The error names the interface.
func ResolveLink(h *netlink.Handle, iface flannel.ExternalInterface) (netlink.Link, error) {
	switch {
	case iface.Index != 0:
		link, err := h.LinkByIndex(iface.Index)
		if err != nil {
			return nil, fmt.Errorf("external interface %q (index %d): %w", iface.Name, iface.Index, err)
		}
		return link, nil
	case iface.Name != "":
		link, err := h.LinkByName(iface.Name)
		if err != nil {
			return nil, fmt.Errorf("external interface %q: %w", iface.Name, err)
		}
		return link, nil
	}
	return nil, errors.New("no external interface given")
}

// BindInterface resolves iface's link through h and returns iface completed
// from it (Index always; Name and MTU when unset). It fails when a family
// that cfg enables has no public address on iface. Backends call it from
// Prepare.
func BindInterface(h *netlink.Handle, iface flannel.ExternalInterface, cfg lease.Config) (flannel.ExternalInterface, error) {
	link, err := ResolveLink(h, iface)
	if err != nil {
		return iface, err
	}
	iface.Index = link.Attrs().Index
	if iface.Name == "" {
		iface.Name = link.Attrs().Name
	}
	if iface.MTU == 0 {
		iface.MTU = link.Attrs().MTU
	}
	if cfg.EnableIPv4 && !iface.PublicIP.IsValid() {
		return iface, fmt.Errorf("interface %s has no public IPv4 address and IPv4 is enabled", iface.Name)
	}
	if cfg.EnableIPv6 && !iface.PublicIPv6.IsValid() {
		return iface, fmt.Errorf("interface %s has no public IPv6 address and IPv6 is enabled", iface.Name)
	}
	return iface, nil
}
