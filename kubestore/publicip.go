package kubestore

import (
	"context"
	"fmt"
	"net/netip"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// StoredPublicIPs returns the public addresses an operator set on this
// node's Node in the <prefix>/node-public-ip and <prefix>/node-public-ipv6
// annotations, which upstream flanneld reads at start and prefers over its
// --public-ip(v6) flags. An annotation that is absent gives the zero Addr;
// one that is not an address of its family is ignored with a warning
// naming it (never used). The error is only for a failed Node read.
func (s *Store) StoredPublicIPs(ctx context.Context) (v4, v6 netip.Addr, err error) {
	rctx, cancel := s.reqCtx(ctx)
	defer cancel()
	n, err := s.nodes.Get(rctx, s.node, metav1.GetOptions{})
	if err != nil {
		return v4, v6, fmt.Errorf("read node %s for its public-ip annotations: %w", s.node, err)
	}
	read := func(key string, want6 bool) netip.Addr {
		v, ok := n.Annotations[key]
		if !ok || v == "" {
			return netip.Addr{}
		}
		ip, err := netip.ParseAddr(v)
		if err != nil || ip.Is6() != want6 || ip.Is4In6() || ip.Zone() != "" || ip.IsUnspecified() {
			s.log.Warn("ignoring malformed public-ip annotation", "node", s.node, "annotation", key, "value", v)
			return netip.Addr{}
		}
		return ip
	}
	return read(s.ann.nodePublicIP, false), read(s.ann.nodePublicIPv6, true), nil
}
