package ipsec

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"

	"github.com/vishvananda/netlink"

	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/nlsafe"
)

// kernel programs XFRM through a namespace-bound handle. Errors name the
// state by addresses and SPI, never by key.
type kernel struct {
	h      *netlink.Handle
	reqid  uint32
	cipher Cipher
	limits stateLimits // of outbound states
}

func addrOf(ip net.IP) netip.Addr {
	a, _ := netip.AddrFromSlice(ip)
	return a.Unmap()
}

// states lists our states (Reqid).
func (k kernel) states() ([]xstate, error) {
	all, err := nlsafe.Wrap(k.h).XfrmStateList(netlink.FAMILY_ALL)
	if err != nil {
		return nil, err
	}
	var out []xstate
	for _, s := range all {
		if uint32(s.Reqid) != k.reqid || s.Proto != netlink.XFRM_PROTO_ESP || s.Spi == 0 {
			// SPI 0: a larval state the kernel made for a packet that
			// found no state (an ACQUIRE nobody answers); it expires
			// by itself and a real state replaces it.
			continue
		}
		x := xstate{Src: addrOf(s.Src), Dst: addrOf(s.Dst), SPI: uint32(s.Spi), Encap: s.Encap != nil, Peer: -1,
			Packets: s.Statistics.Packets, Bytes: s.Statistics.Bytes}
		if s.Aead != nil {
			x.Key = s.Aead.Key
		}
		out = append(out, x)
	}
	return out, nil
}

func (k kernel) toState(s xstate) *netlink.XfrmState {
	st := &netlink.XfrmState{
		Src:   ipconv.IPFromAddr(s.Src),
		Dst:   ipconv.IPFromAddr(s.Dst),
		Proto: netlink.XFRM_PROTO_ESP,
		Mode:  netlink.XFRM_MODE_TUNNEL,
		Spi:   int(s.SPI),
		Reqid: int(k.reqid),
		// 64-bit sequence numbers, and with them a replay window of
		// more than 32 (netlink wants a window with ESN on every state).
		ESN:          true,
		ReplayWindow: ReplayWindow,
		Aead:         &netlink.XfrmStateAlgo{Name: k.cipher.Name(), Key: s.Key, ICVLen: k.cipher.ICVBits()},
	}
	if s.Out {
		st.Limits = netlink.XfrmStateLimits{
			PacketSoft: k.limits.softPackets, PacketHard: 2 * k.limits.softPackets,
			ByteSoft: k.limits.softBytes, ByteHard: 2 * k.limits.softBytes,
		}
	}
	if s.Encap {
		st.Encap = &netlink.XfrmStateEncap{Type: netlink.XFRM_ENCAP_ESPINUDP, SrcPort: UDPEncapPort, DstPort: UDPEncapPort}
	}
	return st
}

func (k kernel) addState(s xstate) error {
	if err := k.h.XfrmStateAdd(k.toState(s)); err != nil && !errors.Is(err, syscall.EEXIST) {
		return fmt.Errorf("add esp state %s->%s spi %#x: %w", s.Src, s.Dst, s.SPI, err)
	}
	return nil
}

func (k kernel) delState(s xstate) error {
	st := &netlink.XfrmState{Src: ipconv.IPFromAddr(s.Src), Dst: ipconv.IPFromAddr(s.Dst), Proto: netlink.XFRM_PROTO_ESP, Spi: int(s.SPI)}
	if err := k.h.XfrmStateDel(st); err != nil && !errors.Is(err, syscall.ESRCH) && !errors.Is(err, syscall.ENOENT) {
		return fmt.Errorf("delete esp state %s->%s spi %#x: %w", s.Src, s.Dst, s.SPI, err)
	}
	return nil
}

// policies lists our policies: those with a template of our reqid and the
// template-less ones with our allow/block priorities.
func (k kernel) policies() ([]xpolicy, error) {
	all, err := nlsafe.Wrap(k.h).XfrmPolicyList(netlink.FAMILY_ALL)
	if err != nil {
		return nil, err
	}
	var out []xpolicy
	for _, p := range all {
		src, ok1 := ipconv.PrefixFromIPNet(p.Src)
		dst, ok2 := ipconv.PrefixFromIPNet(p.Dst)
		if !ok1 || !ok2 || p.Mark != nil || p.Ifid != 0 {
			continue
		}
		src, dst = sameFamily(src, dst)
		x := xpolicy{Src: src, Dst: dst, Dir: dir(p.Dir), Priority: p.Priority, Block: p.Action == netlink.XFRM_POLICY_BLOCK, Peer: -1}
		switch {
		case len(p.Tmpls) == 1 && uint32(p.Tmpls[0].Reqid) == k.reqid:
			x.TmplSrc, x.TmplDst = addrOf(p.Tmpls[0].Src), addrOf(p.Tmpls[0].Dst)
			x.TmplSPI = uint32(p.Tmpls[0].Spi)
		case len(p.Tmpls) == 0 && (p.Priority == prioAllow || p.Priority == prioBlock):
		default:
			continue
		}
		out = append(out, x)
	}
	return out, nil
}

// sameFamily gives an all-zero prefix (::/0 of an IPv6 selector, which
// netlink's listing reads as 0.0.0.0/0) the family of the other.
func sameFamily(src, dst netip.Prefix) (netip.Prefix, netip.Prefix) {
	unspec := func(p, other netip.Prefix) netip.Prefix {
		if p.Bits() == 0 && p.Addr().IsUnspecified() && other.Addr().Is6() {
			return netip.PrefixFrom(netip.IPv6Unspecified(), 0)
		}
		return p
	}
	return unspec(src, dst), unspec(dst, src)
}

func (k kernel) toPolicy(p xpolicy) *netlink.XfrmPolicy {
	np := &netlink.XfrmPolicy{
		Src:      ipconv.IPNetFromPrefix(p.Src),
		Dst:      ipconv.IPNetFromPrefix(p.Dst),
		Dir:      netlink.Dir(p.Dir),
		Priority: p.Priority,
		Action:   netlink.XFRM_POLICY_ALLOW,
	}
	if p.Block {
		np.Action = netlink.XFRM_POLICY_BLOCK
	}
	if p.TmplSrc.IsValid() {
		np.Tmpls = []netlink.XfrmPolicyTmpl{{
			Src:   ipconv.IPFromAddr(p.TmplSrc),
			Dst:   ipconv.IPFromAddr(p.TmplDst),
			Proto: netlink.XFRM_PROTO_ESP,
			Mode:  netlink.XFRM_MODE_TUNNEL,
			Reqid: int(k.reqid),
			Spi:   int(p.TmplSPI),
		}}
	}
	return np
}

func (k kernel) upsertPolicy(p xpolicy) error {
	if err := k.h.XfrmPolicyUpdate(k.toPolicy(p)); err != nil {
		return fmt.Errorf("program xfrm policy %s: %w", p, err)
	}
	return nil
}

func (k kernel) delPolicy(p xpolicy) error {
	if err := k.h.XfrmPolicyDel(k.toPolicy(p)); err != nil && !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("delete xfrm policy %s: %w", p, err)
	}
	return nil
}

// probeESP adds and deletes a throwaway state with the cipher, so a kernel
// without ESP says so before anything is published.
func probeESP(h *netlink.Handle, o Options) error {
	k := kernel{h: h, reqid: o.Reqid, cipher: o.Cipher}
	s := xstate{
		Src: netip.MustParseAddr("192.0.2.1"), Dst: netip.MustParseAddr("192.0.2.2"),
		SPI: 0xff, Key: make([]byte, o.Cipher.keyLen()),
	}
	if err := h.XfrmStateAdd(k.toState(s)); err != nil && !errors.Is(err, syscall.EEXIST) {
		return fmt.Errorf("%w: probe esp state with %s: %v", ErrNoESP, o.Cipher.Name(), err)
	}
	return k.delState(s)
}

// CheckKernel reports whether the kernel behind h can hold ESP states with
// cipher c: nil, or an error wrapping ErrNoESP. Prepare makes the same
// check; callers use it to say early and clearly that ipsec cannot run.
func CheckKernel(h *netlink.Handle, c Cipher) error {
	return probeESP(h, Options{Cipher: c}.withDefaults())
}
