package netlab

import (
	"context"
	"fmt"
	"net/netip"
	"sync"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Node is one machine of the Lab: a namespace with an underlay interface on
// one segment, a default route via the router and forwarding enabled. Its
// exported fields are set by New and must not be changed.
type Node struct {
	// Name is "node<i>".
	Name string
	// NSName is the namespace's name, "<lab>-node<i>" (for ip netns exec).
	NSName string
	// NS is the node's namespace; owned by the Lab, closed by Lab.Close.
	NS netns.NsHandle
	// Handle is a netlink handle bound to NS; owned by the Lab.
	Handle *netlink.Handle
	// Iface is the underlay interface in NS, "eth0".
	Iface string
	// IP and IPv6 are the underlay addresses, invalid when the family is
	// off: 172.30.<s>.<10+i>/24 and fd00:172:30:<s>::<a+i>/64.
	IP, IPv6 netip.Addr
	// Segment is the index of the node's L2 segment.
	Segment int

	lab *Lab

	mu      sync.Mutex
	bridge  netlink.Link // cni0, nil until the first AddPod
	subnet  netip.Prefix // pod subnets served by cni0
	subnet6 netip.Prefix
	hosts   int // pod addresses handed out so far
	vethSeq int
	pods    map[string]*Pod
}

func nodeSysctls() []sysctl { return forwardingSysctls() }

// addNode creates node i on segment seg.
func (l *Lab) addNode(i int, seg *ownedNS) (*Node, error) {
	name := fmt.Sprintf("node%d", i)
	o, err := l.addNS(name, nodeSysctls())
	if err != nil {
		return nil, err
	}
	s := i % l.opts.Segments
	link, err := l.attach(o.h, o.name, UnderlayIface, seg, fmt.Sprintf("n%d", i))
	if err != nil {
		return nil, err
	}
	ip, ip6 := nodeAddrs(i, l.opts.Segments)
	if err := l.configure(o.h, o.name, link, ip, ip6, RouterIP(s), RouterIPv6(s)); err != nil {
		return nil, err
	}
	n := &Node{
		Name:    name,
		NSName:  o.name,
		NS:      o.ns,
		Handle:  o.h,
		Iface:   UnderlayIface,
		Segment: s,
		lab:     l,
		pods:    map[string]*Pod{},
	}
	if l.opts.IPv4 {
		n.IP = ip
	}
	if l.opts.IPv6 {
		n.IPv6 = ip6
	}
	return n, nil
}

// Do runs fn on a locked OS thread inside the node's namespace and returns
// its error. fn must not start goroutines that expect to stay in the
// namespace. If the thread cannot be switched back it is discarded.
func (n *Node) Do(fn func() error) error {
	if err := n.lab.begin(); err != nil {
		return err
	}
	defer n.lab.end()
	return inNS(n.NS, fn)
}

// Ping sends ICMP (or ICMPv6) echo requests from the node's underlay address
// of dst's family until one is answered or ctx ends.
func (n *Node) Ping(ctx context.Context, dst netip.Addr) error {
	if err := n.lab.begin(); err != nil {
		return err
	}
	defer n.lab.end()
	return ping(ctx, n.NS, n.Name, pickSrc(dst, n.IP, n.IPv6), dst)
}

// Pods returns the node's pods in no particular order.
func (n *Node) Pods() []*Pod {
	n.mu.Lock()
	defer n.mu.Unlock()
	pods := make([]*Pod, 0, len(n.pods))
	for _, p := range n.pods {
		pods = append(pods, p)
	}
	return pods
}

// BridgeIP returns the addresses of cni0 (the pods' gateways); invalid
// before the first AddPod or when the family has no pod subnet.
func (n *Node) BridgeIP() (v4, v6 netip.Addr) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.subnet.IsValid() {
		v4 = hostAddr(n.subnet, 1)
	}
	if n.subnet6.IsValid() {
		v6 = hostAddr(n.subnet6, 1)
	}
	return v4, v6
}

// pickSrc returns the address of dst's family among v4, v6 (possibly
// invalid).
func pickSrc(dst, v4, v6 netip.Addr) netip.Addr {
	if dst.Is4() {
		return v4
	}
	return v6
}
