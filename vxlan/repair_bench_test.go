package vxlan

import (
	"context"
	"fmt"
	"net/netip"
	"testing"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/lease"
	"os"
)

// BenchmarkRepair is the periodic full resync of a node that holds 5,000
// programmed peers and whose kernel tables are in sync: a dump of every
// route, neighbour and FDB entry, each checked against the memos (no
// entry is written, nothing is diffed). Needs root.
func BenchmarkRepair(b *testing.B) {
	n, _ := benchNode(b, 5000)
	b.ReportAllocs()
	for b.Loop() {
		n.r.Repair(context.Background(), backend.Periodic)
	}
}

// BenchmarkJoin is a peer joining a node that holds 5,000 programmed
// peers, then leaving: two Applies of the incremental path, each
// programming one peer's route, neighbour and FDB entry. What they
// allocate does not grow with the peers. Needs root.
func BenchmarkJoin(b *testing.B) {
	n, peers := benchNode(b, 5000)
	joined := append(peers, benchPeer(6000))
	ctx := context.Background()
	b.ReportAllocs()
	for b.Loop() {
		if err := n.Apply(ctx, joined); err != nil {
			b.Fatal(err)
		}
		if err := n.Apply(ctx, peers); err != nil {
			b.Fatal(err)
		}
	}
}

// benchNode starts vxlan on a one-node lab and applies size peers (and
// its own lease, first).
func benchNode(b *testing.B, size int) (*Network, []lease.Lease) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	lab, err := netlab.New(netlab.Options{Nodes: 1, IPv4: true})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { lab.Close() })
	node := lab.Nodes[0]
	iface, err := backend.FindInterface(node.Handle, backend.InterfaceOptions{IPv4: true})
	if err != nil {
		b.Fatal(err)
	}
	bk, err := New(Options{})
	if err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	env := flannel.Env{Config: lease.Config{EnableIPv4: true, BackendType: Type, Network: netip.MustParsePrefix("10.0.0.0/8"), SubnetLen: 24},
		Iface: iface, Handle: node.Handle, NS: node.NS}
	attrs, err := bk.Prepare(ctx, env)
	if err != nil {
		b.Fatal(err)
	}
	own := lease.Lease{Subnet: netip.MustParsePrefix("10.255.0.0/24"), Attrs: attrs}
	nwk, err := bk.Start(ctx, own)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = bk.Cleanup(ctx, env) })
	n := nwk.(*Network)
	peers := []lease.Lease{own}
	for k := range size {
		peers = append(peers, benchPeer(k))
	}
	if err := n.Apply(ctx, peers); err != nil {
		b.Fatal(err)
	}
	return n, peers
}

// benchPeer is synthetic peer k (k below 39,936): subnet 10.<k/256>.<k%256>.0/24,
// with a public IP and VTEP MAC of its own.
func benchPeer(k int) lease.Lease {
	return lease.Lease{
		Subnet: netip.MustParsePrefix(fmt.Sprintf("10.%d.%d.0/24", k>>8, k&255)),
		Attrs: lease.Attrs{BackendType: Type, PublicIP: netip.MustParseAddr(fmt.Sprintf("172.30.%d.%d", 100+k>>8, k&255)),
			BackendData: []byte(fmt.Sprintf(`{"VNI":1,"VtepMAC":"0a:00:00:00:%02x:%02x"}`, k>>8, k&255))},
	}
}
