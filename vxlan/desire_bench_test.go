package vxlan

import (
	"fmt"
	"net/netip"
	"testing"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/lease"
)

func BenchmarkDesire(b *testing.B) {
	var peers []lease.Lease
	for k := range 1000 {
		peers = append(peers, lease.Lease{
			Subnet: netip.MustParsePrefix(fmt.Sprintf("10.%d.%d.0/24", k>>8, k&255)),
			Attrs: lease.Attrs{BackendType: Type, PublicIP: netip.MustParseAddr(fmt.Sprintf("100.64.%d.%d", k>>8, k&255)),
				BackendData: []byte(fmt.Sprintf(`{"VNI":1,"VtepMAC":"0a:00:00:00:%02x:%02x"}`, k>>8, k&255))},
		})
	}
	n := newNetwork(flannel.Env{}, lease.Lease{Subnet: netip.MustParsePrefix("10.255.0.0/24")}, Options{}.withDefaults(), []*device{{spec: devSpec{name: "flannel.1"}, index: 5}})
	b.Run("fresh", func(b *testing.B) {
		for b.Loop() {
			var failed backend.PeerErrs
			n.desire(peers, func(netip.Addr) bool { return false }, &failed, memoBook{})
		}
	})
	// A periodic full repair of an unchanged peer set keeps every memo.
	var failed backend.PeerErrs
	prev := n.desire(peers, func(netip.Addr) bool { return false }, &failed, memoBook{})
	b.Run("kept", func(b *testing.B) {
		for b.Loop() {
			var failed backend.PeerErrs
			n.desire(peers, func(netip.Addr) bool { return false }, &failed, prev)
		}
	})
}
