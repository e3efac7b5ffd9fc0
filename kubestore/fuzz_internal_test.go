package kubestore

import (
	"encoding/json"
	"os"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/flannelkit/flannel/lease"
)

// FuzzNodeLease: reading a Node (any JSON an apiserver could hold) never
// panics; a lease it yields has subnets of the right families (inside the
// network when strict), valid public addresses of those families, backend
// data that is valid JSON, and survives the informer's strip unchanged.
func FuzzNodeLease(f *testing.F) {
	if b, err := os.ReadFile("testdata/node.json"); err == nil {
		f.Add(b)
	}
	for _, s := range []string{
		`{"metadata":{"name":"n","annotations":{"flannel.alpha.coreos.com/kube-subnet-manager":"true","flannel.alpha.coreos.com/public-ip":"10.0.0.1","flannel.alpha.coreos.com/public-ipv6":"fd00::1","flannel.alpha.coreos.com/backend-data":"null"}},"spec":{"podCIDRs":["10.244.1.0/24","fd00:10:244:1::/64"]}}`,
		`{"metadata":{"annotations":{"flannel.alpha.coreos.com/kube-subnet-manager":"true","flannel.alpha.coreos.com/public-ip":"::ffff:10.0.0.1"}},"spec":{"podCIDR":"10.244.1.0/24"}}`,
		`{"metadata":{"annotations":{"flannel.alpha.coreos.com/kube-subnet-manager":"true"}},"spec":{"podCIDRs":["172.0.0.0/8"]}}`,
		`{"spec":{"podCIDRs":["not a cidr","10.244.1.0/24"]}}`,
	} {
		f.Add([]byte(s))
	}
	cfg, err := lease.ParseConfig([]byte(`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56"}`))
	if err != nil {
		f.Fatal(err)
	}
	s, err := New(fake.NewClientset().CoreV1().Nodes(), Options{NodeName: "self", Config: cfg})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var n corev1.Node
		if json.Unmarshal(data, &n) != nil {
			return
		}
		for _, strict := range []bool{false, true} {
			l, err := s.nodeLease(fieldsOf(&n), strict)
			if err != nil {
				continue
			}
			if l.Subnet.IsValid() && (!l.Subnet.Addr().Is4() || strict && !cfg.Network.Contains(l.Subnet.Addr())) {
				t.Fatalf("bad IPv4 subnet %s (strict %v)", l.Subnet, strict)
			}
			if l.IPv6Subnet.IsValid() && (!l.IPv6Subnet.Addr().Is6() || strict && !cfg.IPv6Network.Contains(l.IPv6Subnet.Addr())) {
				t.Fatalf("bad IPv6 subnet %s (strict %v)", l.IPv6Subnet, strict)
			}
			if l.Subnet.IsValid() && (!l.Attrs.PublicIP.Is4() || l.Attrs.PublicIP.Is4In6()) {
				t.Fatalf("IPv4 lease with public IP %s", l.Attrs.PublicIP)
			}
			if l.IPv6Subnet.IsValid() && (!l.Attrs.PublicIPv6.Is6() || l.Attrs.PublicIPv6.Is4In6()) {
				t.Fatalf("IPv6 lease with public IPv6 %s", l.Attrs.PublicIPv6)
			}
			for _, d := range []json.RawMessage{l.Attrs.BackendData, l.Attrs.BackendV6Data} {
				if d != nil && !json.Valid(d) {
					t.Fatalf("backend data %q is not JSON", d)
				}
			}
			stripped, err := s.strip(&n)
			if err != nil {
				t.Fatal(err)
			}
			back, err := s.nodeLease(stripped.(*peerNode).fields(), strict)
			if err != nil || !back.SameSubnets(l) || !back.Attrs.Equal(l.Attrs) {
				t.Fatalf("strip changed the lease: %v -> %v (%v)", l, back, err)
			}
		}
	})
}
