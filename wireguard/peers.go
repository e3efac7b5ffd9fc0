package wireguard

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"
	"time"

	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/flannelkit/flannel/lease"
)

// devSpec is one flannel WireGuard device as it must be.
type devSpec struct {
	name   string
	port   int
	v4, v6 bool // families it carries (of the own lease)
	mtu    int
	// single: one device for both families (not ModeSeparate).
	single bool
}

// wantPeer is one peer of a device as the kernel must hold it.
type wantPeer struct {
	key      wgtypes.Key
	endpoint netip.AddrPort
	allowed  []netip.Prefix // masked, sorted
	leases   []int          // indexes of the leases it stands for
}

// local is what the peer computation needs to know about this node.
type local struct {
	own        lease.Lease
	pub        wgtypes.Key // own public key
	opts       Options
	publicIP   netip.Addr // own public addresses (auto mode)
	publicIPv6 netip.Addr
}

// skipReason says why a lease is not a peer of any device; "" when it is
// one (or failed, which desiredPeers reports separately).
func skipReason(l local, p lease.Lease) string {
	switch {
	case p.Attrs.BackendType != Type:
		return "another backend type"
	case p.SameSubnets(l.own):
		return "own lease"
	}
	return ""
}

// desiredPeers computes the peers of device d from the leases: per peer
// its published key, its endpoint (public address and published port of
// the family the device uses) and its subnets of the device's families as
// AllowedIPs. Leases that cannot be programmed are returned in failed by
// index; leases of other backends, the own lease and leases with our own
// public key (a stale lease of this node) are left out. Two leases with
// one key make one peer with both leases' subnets (the first's endpoint).
// It has no side effects.
func desiredPeers(l local, d devSpec, peers []lease.Lease, failed map[int]error) []wantPeer {
	var out []wantPeer
	byKey := map[wgtypes.Key]int{}
	for i, p := range peers {
		if skipReason(l, p) != "" {
			continue
		}
		w, ok, err := peerFor(l, d, p)
		if err != nil {
			failed[i] = errors.Join(failed[i], fmt.Errorf("%s: %w", d.name, err))
			continue
		}
		if !ok || w.key == l.pub {
			continue
		}
		w.leases = []int{i}
		if j, dup := byKey[w.key]; dup {
			out[j].allowed = mergePrefixes(out[j].allowed, w.allowed)
			out[j].leases = append(out[j].leases, i)
			continue
		}
		byKey[w.key] = len(out)
		out = append(out, w)
	}
	return out
}

// peerFor is lease p as a peer of device d; ok is false when p has no
// subnet of d's families.
func peerFor(l local, d devSpec, p lease.Lease) (wantPeer, bool, error) {
	var w wantPeer
	if d.v4 && p.Subnet.IsValid() {
		w.allowed = append(w.allowed, p.Subnet.Masked())
	}
	if d.v6 && p.IPv6Subnet.IsValid() {
		w.allowed = append(w.allowed, p.IPv6Subnet.Masked())
	}
	if len(w.allowed) == 0 {
		return w, false, nil
	}
	slices.SortFunc(w.allowed, comparePrefix)
	v6 := endpointV6(l, d, p)
	var (
		k    *peerKey
		ip   netip.Addr
		port int
		err  error
	)
	if d.single {
		k, port, err = singleKey(l, p)
	} else if v6 {
		k, err = familyKey(p.Attrs.BackendV6Data, "BackendV6Data")
		port = l.opts.ListenPortV6
	} else {
		k, err = familyKey(p.Attrs.BackendData, "BackendData")
		port = l.opts.ListenPort
	}
	if err != nil {
		return w, false, err
	}
	if !d.single && k.port != 0 {
		port = k.port
	}
	ip = p.Attrs.PublicIP
	if v6 {
		ip = p.Attrs.PublicIPv6
	}
	if !ip.IsValid() {
		fam := "IPv4"
		if v6 {
			fam = "IPv6"
		}
		return w, false, fmt.Errorf("no public %s address to send to", fam)
	}
	w.key = k.key
	w.endpoint = netip.AddrPortFrom(ip.Unmap(), uint16(port))
	return w, true, nil
}

func familyKey(raw []byte, field string) (*peerKey, error) {
	k, err := parseBackendData(raw)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", field, err)
	}
	return &k, nil
}

// singleKey is the key and port of a peer on the one device of the
// single-device modes: the key of either family's data (upstream prefers
// the IPv6 data's; both hold the same), and the port of the IPv4 data
// when it has one, since upstream's single-device nodes listen on
// ListenPort and publish that there, but ListenPortV6 in BackendV6Data.
// Zero port: the own ListenPort, as upstream before v0.26.6 assumed.
func singleKey(l local, p lease.Lease) (*peerKey, int, error) {
	var k4, k6 *peerKey
	var errs []error
	if p.Subnet.IsValid() || len(p.Attrs.BackendData) > 0 {
		k, err := familyKey(p.Attrs.BackendData, "BackendData")
		k4 = k
		errs = append(errs, err)
	}
	if p.IPv6Subnet.IsValid() || len(p.Attrs.BackendV6Data) > 0 {
		k, err := familyKey(p.Attrs.BackendV6Data, "BackendV6Data")
		k6 = k
		errs = append(errs, err)
	}
	k := k6
	if k == nil {
		k = k4
	}
	if k == nil {
		if err := errors.Join(errs...); err != nil {
			return nil, 0, err
		}
		return nil, 0, errors.New("no public key published")
	}
	port := l.opts.ListenPort
	switch {
	case k4 != nil && k4.port != 0:
		port = k4.port
	case k6 != nil && k6.port != 0:
		port = k6.port
	}
	return k, port, nil
}

// endpointV6 reports whether the peer is reached over IPv6 on device d.
// ModeAuto follows upstream: IPv4 unless the peer has an IPv6 address
// and its IPv4 address is private or absent while both ends' IPv6
// addresses are public; and IPv6 when IPv4 cannot work at all (the peer
// or this node has no public IPv4 address).
func endpointV6(l local, d devSpec, p lease.Lease) bool {
	if !d.single {
		return d.v6 && !d.v4
	}
	switch l.opts.Mode {
	case ModeIPv4:
		return false
	case ModeIPv6:
		return true
	}
	peer4, peer6 := p.Attrs.PublicIP, p.Attrs.PublicIPv6
	switch {
	case !peer6.IsValid() || !l.publicIPv6.IsValid():
		return false
	case !peer4.IsValid() || !l.publicIP.IsValid():
		return true
	case !peer4.IsPrivate():
		return false
	}
	return !peer6.IsPrivate() && !l.publicIPv6.IsPrivate()
}

func comparePrefix(a, b netip.Prefix) int {
	if c := a.Addr().Compare(b.Addr()); c != 0 {
		return c
	}
	return a.Bits() - b.Bits()
}

func mergePrefixes(a, b []netip.Prefix) []netip.Prefix {
	out := append(slices.Clone(a), b...)
	slices.SortFunc(out, comparePrefix)
	return slices.Compact(out)
}

// settings are the per-peer values that come from the options.
type settings struct {
	psk       wgtypes.Key // zero: none
	keepalive time.Duration
}

// planPeers computes the peer changes that turn actual into want: a
// PeerConfig for every wanted peer that is missing or differs (endpoint,
// AllowedIPs, keepalive, PSK), then a removal for every actual peer not
// wanted. Adds come first so that a peer whose key changed takes over its
// AllowedIPs before the old key's peer goes: no moment without a peer for
// the subnet. It has no side effects.
func planPeers(want []wantPeer, actual []wgtypes.Peer, s settings) []wgtypes.PeerConfig {
	have := make(map[wgtypes.Key]wgtypes.Peer, len(actual))
	for _, p := range actual {
		have[p.PublicKey] = p
	}
	wanted := make(map[wgtypes.Key]bool, len(want))
	var ops []wgtypes.PeerConfig
	for _, w := range want {
		wanted[w.key] = true
		if a, ok := have[w.key]; ok && samePeer(w, a, s) {
			continue
		}
		psk, ka := s.psk, s.keepalive
		allowed := make([]net.IPNet, 0, len(w.allowed))
		for _, p := range w.allowed {
			allowed = append(allowed, net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())})
		}
		ops = append(ops, wgtypes.PeerConfig{
			PublicKey:                   w.key,
			PresharedKey:                &psk,
			Endpoint:                    net.UDPAddrFromAddrPort(w.endpoint),
			PersistentKeepaliveInterval: &ka,
			ReplaceAllowedIPs:           true,
			AllowedIPs:                  allowed,
		})
	}
	for _, a := range actual {
		if !wanted[a.PublicKey] {
			ops = append(ops, wgtypes.PeerConfig{PublicKey: a.PublicKey, Remove: true})
		}
	}
	return ops
}

// samePeer reports whether the kernel's peer a already is w.
func samePeer(w wantPeer, a wgtypes.Peer, s settings) bool {
	if a.PresharedKey != s.psk || a.PersistentKeepaliveInterval != s.keepalive {
		return false
	}
	if a.Endpoint == nil {
		return false
	}
	if ep := a.Endpoint.AddrPort(); netip.AddrPortFrom(ep.Addr().Unmap(), ep.Port()) != w.endpoint {
		return false
	}
	got := make([]netip.Prefix, 0, len(a.AllowedIPs))
	for _, n := range a.AllowedIPs {
		ones, _ := n.Mask.Size()
		ip, ok := netip.AddrFromSlice(n.IP)
		if !ok {
			return false
		}
		got = append(got, netip.PrefixFrom(ip.Unmap(), ones).Masked())
	}
	slices.SortFunc(got, comparePrefix)
	return slices.Equal(got, w.allowed)
}
