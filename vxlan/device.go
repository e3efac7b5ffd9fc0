package vxlan

import (
	"bytes"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"strconv"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

// devSpec is what one flannel VXLAN device must look like.
type devSpec struct {
	name     string
	v6       bool // IPv6 underlay
	vni      int
	port     int
	local    netip.Addr // source address on the external interface
	extIndex int
	gbp      bool
	learning bool
	mtu      int
	noTXCsum bool // turn TX checksum offload off
}

// deviceName is flannel.<VNI> for an IPv4 underlay, flannel-v6.<VNI> for
// IPv6 (upstream's names).
func deviceName(vni int, v6 bool) string {
	if v6 {
		return "flannel-v6." + strconv.Itoa(vni)
	}
	return "flannel." + strconv.Itoa(vni)
}

// randomMAC returns a random locally administered unicast MAC.
func randomMAC() (net.HardwareAddr, error) {
	m := make(net.HardwareAddr, 6)
	if _, err := rand.Read(m); err != nil {
		return nil, fmt.Errorf("random MAC: %w", err)
	}
	m[0] = m[0]&^1 | 2
	return m, nil
}

// mismatch names the first attribute of an existing link that differs from
// s, or returns "" when the link can be reused as is.
func (s devSpec) mismatch(l netlink.Link) string {
	v, ok := l.(*netlink.Vxlan)
	switch {
	case !ok:
		return "type " + l.Type()
	case v.VxlanId != s.vni:
		return "vni " + strconv.Itoa(v.VxlanId)
	case v.Port != s.port:
		return "port " + strconv.Itoa(v.Port)
	case ipconv.AddrFromIP(v.SrcAddr) != s.local:
		return "local " + v.SrcAddr.String()
	case v.VtepDevIndex != s.extIndex:
		return "dev " + strconv.Itoa(v.VtepDevIndex)
	case v.GBP != s.gbp:
		return "gbp " + strconv.FormatBool(v.GBP)
	case v.Learning != s.learning:
		return "learning " + strconv.FormatBool(v.Learning)
	}
	return ""
}

// ensureDevice makes the device match s: an existing one with matching
// attributes is kept (its MAC too: no flap), one with other attributes is
// deleted and recreated with the same MAC, a missing one is created with
// mac (random when nil). The device ends up with s.mtu and up. It returns
// the link as the kernel reports it.
//
// accept_ra is turned off on a created device, and on a reused one when
// first is set (the first ensure of a run): not on every repair.
func ensureDevice(h *netlink.Handle, ns netns.NsHandle, s devSpec, mac net.HardwareAddr, first bool, log *slog.Logger) (*netlink.Vxlan, error) {
	old, err := h.LinkByName(s.name)
	var nf netlink.LinkNotFoundError
	switch {
	case errors.As(err, &nf):
		old = nil
	case err != nil:
		return nil, fmt.Errorf("look up device %s: %w", s.name, err)
	}
	if old != nil {
		why := s.mismatch(old)
		if why == "" {
			return finishDevice(h, ns, s, old.(*netlink.Vxlan), first, log)
		}
		if checkMAC(old.Attrs().HardwareAddr) == nil {
			mac = old.Attrs().HardwareAddr // keep peers' FDB entries valid
		}
		log.Info("replacing device with mismatching attributes", "device", s.name, "mismatch", why)
		if err := h.LinkDel(old); err != nil && !errors.As(err, &nf) {
			return nil, fmt.Errorf("delete mismatching device %s: %w", s.name, err)
		}
	}
	if mac == nil {
		if mac, err = randomMAC(); err != nil {
			return nil, err
		}
	}
	v := &netlink.Vxlan{
		LinkAttrs:    netlink.LinkAttrs{Name: s.name, HardwareAddr: mac, MTU: s.mtu},
		VxlanId:      s.vni,
		VtepDevIndex: s.extIndex,
		SrcAddr:      ipconv.IPFromAddr(s.local),
		Port:         s.port,
		Learning:     s.learning,
		GBP:          s.gbp,
	}
	if err := h.LinkAdd(v); err != nil && !errors.Is(err, syscall.EEXIST) {
		return nil, fmt.Errorf("create device %s (vni %d, port %d, local %s): %w", s.name, s.vni, s.port, s.local, err)
	}
	// Re-read: on EEXIST someone raced us; check what is there.
	l, err := h.LinkByName(s.name)
	if err != nil {
		return nil, fmt.Errorf("look up device %s after creating it: %w", s.name, err)
	}
	if why := s.mismatch(l); why != "" {
		return nil, fmt.Errorf("device %s exists with other attributes (%s)", s.name, why)
	}
	log.Info("device created", "device", s.name, "mac", l.Attrs().HardwareAddr.String(), "vni", s.vni, "port", s.port)
	return finishDevice(h, ns, s, l.(*netlink.Vxlan), true, log)
}

// finishDevice sets the MTU, accept_ra off (when setRA and ns is open) and
// up.
func finishDevice(h *netlink.Handle, ns netns.NsHandle, s devSpec, v *netlink.Vxlan, setRA bool, log *slog.Logger) (*netlink.Vxlan, error) {
	if v.MTU != s.mtu {
		if err := h.LinkSetMTU(v, s.mtu); err != nil {
			return nil, fmt.Errorf("set mtu %d on %s: %w", s.mtu, s.name, err)
		}
		v.MTU = s.mtu
	}
	if setRA && ns.IsOpen() {
		// A VXLAN device must not autoconfigure from router adverts.
		// Not fatal: the device works without it (and upstream only logs).
		if err := nlsafe.SetSysctl(ns, "net/ipv6/conf/"+s.name+"/accept_ra", "0"); err != nil && !errors.Is(err, unix.ENOENT) {
			log.Warn("cannot turn accept_ra off", "device", s.name, "err", err)
		}
	}
	if v.Flags&net.FlagUp == 0 || v.OperState == netlink.OperDown {
		if err := h.LinkSetUp(v); err != nil {
			return nil, fmt.Errorf("set %s up: %w", s.name, err)
		}
		v.Flags |= net.FlagUp
	}
	return v, nil
}

// ensureAddr puts addr (/32 or /128) on the device and removes every other
// global address of that family from it: the device is ours, and an
// address left by a previous lease would answer for another node's subnet.
func ensureAddr(h *netlink.Handle, link netlink.Link, addr netip.Addr, log *slog.Logger) error {
	family := netlink.FAMILY_V4
	if addr.Is6() {
		family = netlink.FAMILY_V6
	}
	want := netip.PrefixFrom(addr, addr.BitLen())
	have, err := nlsafe.Wrap(h).AddrList(link, family)
	if err != nil {
		return err
	}
	found := false
	for _, a := range have {
		p, ok := ipconv.PrefixFromIPNet(a.IPNet)
		if !ok || p.Addr().IsLinkLocalUnicast() {
			continue
		}
		if p.Addr() == addr && p.Bits() == want.Bits() {
			found = true
			continue
		}
		if err := h.AddrDel(link, &a); err != nil && !errors.Is(err, unix.EADDRNOTAVAIL) {
			return fmt.Errorf("remove foreign address %s from %s: %w", p, link.Attrs().Name, err)
		}
		log.Info("foreign address removed", "device", link.Attrs().Name, "addr", p.String())
	}
	if found {
		return nil
	}
	a := &netlink.Addr{IPNet: ipconv.IPNetFromPrefix(want)}
	if addr.Is6() {
		a.Flags = unix.IFA_F_NODAD
	}
	if err := h.AddrReplace(link, a); err != nil {
		return fmt.Errorf("add address %s to %s: %w", want, link.Attrs().Name, err)
	}
	return nil
}

// sameMAC compares two MACs.
func sameMAC(a, b net.HardwareAddr) bool { return bytes.Equal(a, b) }
