package netlab_test

import (
	"context"
	"fmt"
	"net/netip"
	"time"

	"github.com/flannelkit/flannel/internal/netlab"
)

// Two nodes on one segment, a pod on the first; the pod reaches its node and
// the node reaches the other node over the underlay. Needs root, so it has
// no checked output.
func ExampleNew() {
	lab, err := netlab.New(netlab.Options{Nodes: 2, IPv4: true, IPv6: true})
	if err != nil {
		fmt.Println(err)
		return
	}
	defer lab.Close()

	n0, n1 := lab.Nodes[0], lab.Nodes[1]
	pod, err := n0.AddPod("web", netip.MustParsePrefix("10.244.0.0/24"), netip.MustParsePrefix("fd00:10:244::/64"))
	if err != nil {
		fmt.Println(err)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	fmt.Println(pod.Ping(ctx, n0.IP), n0.Ping(ctx, n1.IPv6))
	fmt.Println("debug with: ip netns exec", pod.NSName, "ip addr")
}
