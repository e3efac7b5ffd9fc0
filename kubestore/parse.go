package kubestore

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"

	corev1 "k8s.io/api/core/v1"

	"github.com/flannelkit/flannel/lease"
)

// nodeFields are the parts of a Node its lease is made of: of a
// *corev1.Node (fieldsOf) or of the Watch cache's peerNode.
type nodeFields struct {
	name        string
	annotations map[string]string
	podCIDR     string
	podCIDRs    []string
}

func fieldsOf(n *corev1.Node) nodeFields {
	return nodeFields{name: n.Name, annotations: n.Annotations, podCIDR: n.Spec.PodCIDR, podCIDRs: n.Spec.PodCIDRs}
}

// podCIDRs returns the node's subnets of the enabled families, from
// spec.podCIDRs (spec.podCIDR when that is empty). It returns an error
// wrapping lease.ErrNotAssigned when the node has none yet, and a plain
// error when a CIDR is malformed, lies outside the network or an enabled
// family is missing.
func (s *Store) podCIDRs(n nodeFields) (v4, v6 netip.Prefix, err error) {
	v4, v6, err = s.parseCIDRs(n)
	if err != nil {
		return netip.Prefix{}, netip.Prefix{}, err
	}
	if err := checkNetwork("Network", s.cfg.Network, v4); err != nil {
		return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("node %s: %w", n.name, err)
	}
	if err := checkNetwork("IPv6Network", s.cfg.IPv6Network, v6); err != nil {
		return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("node %s: %w", n.name, err)
	}
	return v4, v6, nil
}

// parseCIDRs is podCIDRs without the network check: Watch leaves that to
// the valid-peer rule (lease.Config.Peers).
func (s *Store) parseCIDRs(n nodeFields) (v4, v6 netip.Prefix, err error) {
	cidrs := n.podCIDRs
	if len(cidrs) == 0 && n.podCIDR != "" {
		cidrs = []string{n.podCIDR}
	}
	if len(cidrs) == 0 {
		return v4, v6, fmt.Errorf("node %s has no podCIDR: %w", n.name, lease.ErrNotAssigned)
	}
	for _, c := range cidrs {
		p, err := netip.ParsePrefix(c)
		if err != nil {
			return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("node %s: podCIDR %q: %w", n.name, c, err)
		}
		if p.Masked() != p {
			return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("node %s: podCIDR %s has host bits set", n.name, p)
		}
		if p.Addr().Is4() {
			v4 = p
		} else {
			v6 = p
		}
	}
	if s.cfg.EnableIPv4 && !v4.IsValid() {
		return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("node %s: no IPv4 podCIDR although IPv4 is enabled", n.name)
	}
	if s.cfg.EnableIPv6 && !v6.IsValid() {
		return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("node %s: no IPv6 podCIDR although IPv6 is enabled", n.name)
	}
	if !s.cfg.EnableIPv4 {
		v4 = netip.Prefix{}
	}
	if !s.cfg.EnableIPv6 {
		v6 = netip.Prefix{}
	}
	return v4, v6, nil
}

// checkNetwork checks one family's podCIDR against the network, as
// upstream does: the network must contain it (its length is the controller
// manager's --node-cidr-mask-size, not SubnetLen).
func checkNetwork(key string, network, p netip.Prefix) error {
	switch {
	case !p.IsValid():
		return nil
	case p.Bits() < network.Bits() || !network.Contains(p.Addr()):
		return fmt.Errorf("podCIDR %s is outside %s %s of the network config", p, key, network)
	}
	return nil
}

// errNotPeer marks a Node that is not a flannel node (yet): no
// kube-subnet-manager annotation or no podCIDR. It is not worth a warning.
var errNotPeer = errors.New("not a flannel node")

// nodeLease turns a (stripped) Node into a peer lease. It returns an error
// wrapping errNotPeer for nodes that are not flannel nodes, and an error
// naming the annotation for malformed ones. With strict, a podCIDR
// outside the network is an error too (Watch leaves that to
// lease.Config.Peers).
func (s *Store) nodeLease(n nodeFields, strict bool) (lease.Lease, error) {
	a := n.annotations
	if a[s.ann.subnetKubeManaged] != "true" {
		return lease.Lease{}, errNotPeer
	}
	cidrs := s.parseCIDRs
	if strict {
		cidrs = s.podCIDRs
	}
	v4, v6, err := cidrs(n)
	if errors.Is(err, lease.ErrNotAssigned) {
		return lease.Lease{}, errNotPeer
	}
	if err != nil {
		return lease.Lease{}, err
	}
	l := lease.Lease{Subnet: v4, IPv6Subnet: v6}
	l.Attrs.BackendType = a[s.ann.backendType]
	if v4.IsValid() {
		if l.Attrs.PublicIP, err = s.annotationAddr(n, s.ann.publicIP, true); err != nil {
			return lease.Lease{}, err
		}
		if l.Attrs.BackendData, err = s.annotationJSON(n, s.ann.backendData); err != nil {
			return lease.Lease{}, err
		}
	}
	if v6.IsValid() {
		if l.Attrs.PublicIPv6, err = s.annotationAddr(n, s.ann.publicIPv6, false); err != nil {
			return lease.Lease{}, err
		}
		if l.Attrs.BackendV6Data, err = s.annotationJSON(n, s.ann.backendV6Data); err != nil {
			return lease.Lease{}, err
		}
	}
	return l, nil
}

func (s *Store) annotationAddr(n nodeFields, key string, is4 bool) (netip.Addr, error) {
	v, ok := n.annotations[key]
	if !ok {
		return netip.Addr{}, fmt.Errorf("node %s: annotation %s is missing", n.name, key)
	}
	a, err := netip.ParseAddr(v)
	if err != nil || a.Is4() != is4 || a.Is4In6() {
		fam := "IPv6"
		if is4 {
			fam = "IPv4"
		}
		return netip.Addr{}, fmt.Errorf("node %s: annotation %s=%q is not an %s address", n.name, key, v, fam)
	}
	return a, nil
}

func (s *Store) annotationJSON(n nodeFields, key string) (json.RawMessage, error) {
	v, ok := n.annotations[key]
	if !ok || v == "" || v == "null" {
		return nil, nil
	}
	if !json.Valid([]byte(v)) {
		return nil, fmt.Errorf("node %s: annotation %s is not valid JSON", n.name, key)
	}
	return json.RawMessage(v), nil
}
