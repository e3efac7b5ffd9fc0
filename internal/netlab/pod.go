package netlab

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// Pod is a namespace behind a node's cni0 bridge. Its exported fields are
// set by AddPod and must not be changed.
type Pod struct {
	// Name is the name given to AddPod.
	Name string
	// NSName is the namespace's name, "<lab>-<node>-<pod>".
	NSName string
	// NS is the pod's namespace; owned by the Lab.
	NS netns.NsHandle
	// Handle is a netlink handle bound to NS; owned by the Lab.
	Handle *netlink.Handle
	// IP and IPv6 are the pod's addresses on eth0, invalid when AddPod got
	// no subnet of that family.
	IP, IPv6 netip.Addr
	// HostIface is the name of the pod's veth in the node namespace.
	HostIface string
	// Node is the node the pod runs on.
	Node *Node
}

// PodOption changes how AddPod builds a pod.
type PodOption func(*podOptions)

type podOptions struct{ mtu int }

// WithMTU sets the MTU of the pod's veth pair (default: the Lab's underlay
// MTU), e.g. to leave room for an encapsulation header.
func WithMTU(mtu int) PodOption { return func(o *podOptions) { o.mtu = mtu } }

// AddPod creates a pod namespace "<lab>-<node>-<name>" whose eth0 is a veth
// to the node's bridge cni0. The first call creates cni0 with the first host
// address of subnet and/or subnet6 (invalid = family off); later calls must
// pass the same subnets. Pods get the next free host addresses (.2, .3, ...)
// and default routes via the bridge addresses. On failure nothing of the pod
// is left behind, and AddPod may be called again.
func (n *Node) AddPod(name string, subnet, subnet6 netip.Prefix, opts ...PodOption) (*Pod, error) {
	o := podOptions{mtu: n.lab.opts.MTU}
	for _, f := range opts {
		f(&o)
	}
	if err := checkPodArgs(name, subnet, subnet6, o); err != nil {
		return nil, fmt.Errorf("node %s: add pod %q: %w", n.Name, name, err)
	}
	subnet, subnet6 = subnet.Masked(), subnet6.Masked()
	if err := n.lab.begin(); err != nil {
		return nil, err
	}
	defer n.lab.end()

	n.mu.Lock()
	defer n.mu.Unlock()
	p, err := n.addPod(name, subnet, subnet6, o)
	if err != nil {
		return nil, fmt.Errorf("node %s: add pod %q: %w", n.Name, name, err)
	}
	return p, nil
}

func checkPodArgs(name string, subnet, subnet6 netip.Prefix, o podOptions) error {
	if name == "" || strings.ContainsAny(name, "/ \t\n") || name == "." || name == ".." {
		return errors.New("invalid pod name")
	}
	if !subnet.IsValid() && !subnet6.IsValid() {
		return errors.New("no subnet")
	}
	if subnet.IsValid() && (!subnet.Addr().Is4() || subnet.Bits() > 30) {
		return fmt.Errorf("subnet %s: want an IPv4 prefix of at most /30", subnet)
	}
	if subnet6.IsValid() && (!subnet6.Addr().Is6() || subnet6.Addr().Is4In6() || subnet6.Bits() > 126) {
		return fmt.Errorf("subnet6 %s: want an IPv6 prefix of at most /126", subnet6)
	}
	if o.mtu < 576 || o.mtu > 65535 || (subnet6.IsValid() && o.mtu < 1280) {
		return fmt.Errorf("mtu %d out of range", o.mtu)
	}
	return nil
}

// addPod does AddPod's work with n.mu held.
func (n *Node) addPod(name string, subnet, subnet6 netip.Prefix, o podOptions) (*Pod, error) {
	if _, ok := n.pods[name]; ok {
		return nil, errors.New("pod exists")
	}
	if err := n.ensureBridge(subnet, subnet6); err != nil {
		return nil, err
	}
	k := n.hosts + 2 // .1 is the bridge
	var ip, ip6 netip.Addr
	if subnet.IsValid() {
		if ip = hostAddr(subnet, k); !ip.IsValid() {
			return nil, fmt.Errorf("subnet %s is full", subnet)
		}
	}
	if subnet6.IsValid() {
		if ip6 = hostAddr(subnet6, k); !ip6.IsValid() {
			return nil, fmt.Errorf("subnet %s is full", subnet6)
		}
	}

	l := n.lab
	ons, err := l.addNS(n.Name+"-"+name, podSysctls())
	if err != nil {
		return nil, err
	}
	n.vethSeq++
	p := &Pod{
		Name:      name,
		NSName:    ons.name,
		NS:        ons.ns,
		Handle:    ons.h,
		IP:        ip,
		IPv6:      ip6,
		HostIface: fmt.Sprintf("veth%d", n.vethSeq),
		Node:      n,
	}
	if err := n.wirePod(p, o.mtu); err != nil {
		return nil, errors.Join(err, l.disown(ons))
	}
	n.hosts++
	n.pods[name] = p
	return p, nil
}

func podSysctls() []sysctl { return commonSysctls() }

// wirePod creates the veth pair between cni0 and the pod and configures the
// pod side.
func (n *Node) wirePod(p *Pod, mtu int) error {
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: p.HostIface, MTU: mtu},
		PeerName:      PodIface,
		PeerMTU:       uint32(mtu),
		PeerNamespace: netlink.NsFd(p.NS),
	}
	if err := n.Handle.LinkAdd(veth); err != nil {
		return fmt.Errorf("add veth %s (peer %s in %s): %w", p.HostIface, PodIface, p.NSName, err)
	}
	host, err := n.Handle.LinkByName(p.HostIface)
	if err != nil {
		return fmt.Errorf("find veth %s: %w", p.HostIface, err)
	}
	if err := n.Handle.LinkSetMaster(host, n.bridge); err != nil {
		return fmt.Errorf("attach %s to %s: %w", p.HostIface, BridgeName, err)
	}
	if err := n.Handle.LinkSetUp(host); err != nil {
		return fmt.Errorf("set %s up: %w", p.HostIface, err)
	}
	eth, err := p.Handle.LinkByName(PodIface)
	if err != nil {
		return fmt.Errorf("find %s in %s: %w", PodIface, p.NSName, err)
	}
	if err := p.Handle.LinkSetUp(eth); err != nil {
		return fmt.Errorf("set %s up in %s: %w", PodIface, p.NSName, err)
	}
	for _, f := range []struct {
		ip     netip.Addr
		subnet netip.Prefix
	}{{p.IP, n.subnet}, {p.IPv6, n.subnet6}} {
		if !f.ip.IsValid() {
			continue
		}
		if err := addAddr(p.Handle, eth, netip.PrefixFrom(f.ip, f.subnet.Bits())); err != nil {
			return fmt.Errorf("%s in %s: %w", PodIface, p.NSName, err)
		}
		if err := addDefaultRoute(p.Handle, eth, hostAddr(f.subnet, 1)); err != nil {
			return fmt.Errorf("%s in %s: %w", PodIface, p.NSName, err)
		}
	}
	return nil
}

// ensureBridge creates cni0 on the first call and checks the subnets on
// later ones.
func (n *Node) ensureBridge(subnet, subnet6 netip.Prefix) error {
	if n.bridge != nil {
		if subnet != n.subnet || subnet6 != n.subnet6 {
			return fmt.Errorf("%s serves %s %s, not %s %s", BridgeName, n.subnet, n.subnet6, subnet, subnet6)
		}
		return nil
	}
	snoop := false
	br := &netlink.Bridge{
		LinkAttrs:         netlink.LinkAttrs{Name: BridgeName},
		MulticastSnooping: &snoop,
	}
	if err := n.Handle.LinkAdd(br); err != nil {
		return fmt.Errorf("add bridge %s: %w", BridgeName, err)
	}
	link, err := n.Handle.LinkByName(BridgeName)
	if err == nil {
		err = n.Handle.LinkSetUp(link)
	}
	if err != nil {
		return errors.Join(fmt.Errorf("set bridge %s up: %w", BridgeName, err), n.deleteBridge())
	}
	for _, s := range []netip.Prefix{subnet, subnet6} {
		if !s.IsValid() {
			continue
		}
		if err := addAddr(n.Handle, link, netip.PrefixFrom(hostAddr(s, 1), s.Bits())); err != nil {
			return errors.Join(fmt.Errorf("bridge %s: %w", BridgeName, err), n.deleteBridge())
		}
	}
	n.bridge, n.subnet, n.subnet6 = link, subnet, subnet6
	return nil
}

func (n *Node) deleteBridge() error {
	link, err := n.Handle.LinkByName(BridgeName)
	if err == nil {
		err = n.Handle.LinkDel(link)
	}
	if err != nil {
		return fmt.Errorf("delete bridge %s: %w", BridgeName, err)
	}
	return nil
}

// hostAddr returns the k-th address of p (k=1 is the first host), or the
// zero Addr when it is outside p or is p's IPv4 broadcast address.
func hostAddr(p netip.Prefix, k int) netip.Addr {
	b := p.Masked().Addr().AsSlice()
	carry := uint64(k)
	for i := len(b) - 1; i >= 0 && carry > 0; i-- {
		sum := uint64(b[i]) + carry&0xff
		b[i] = byte(sum)
		carry = carry>>8 + sum>>8
	}
	if carry > 0 {
		return netip.Addr{}
	}
	a, _ := netip.AddrFromSlice(b)
	if !p.Contains(a) {
		return netip.Addr{}
	}
	if a.Is4() && p.Bits() < 31 && !p.Contains(a.Next()) {
		return netip.Addr{} // broadcast
	}
	return a
}
