package netlab

import (
	"errors"
	"fmt"
	"net/netip"
)

// NewPodNS creates an empty pod namespace "<lab>-<node>-<name>" (lo up,
// nothing else), for a CNI plugin to wire: the caller runs the plugin with
// CNI_NETNS=/run/netns/<NSName> and then calls SetAddrs with the addresses
// from its result. The namespace is the Lab's, removed by DeletePod or
// Close. On failure nothing is left behind.
func (n *Node) NewPodNS(name string) (*Pod, error) {
	if err := checkPodArgs(name, netip.MustParsePrefix("10.0.0.0/24"), netip.Prefix{}, podOptions{mtu: 1500}); err != nil {
		return nil, fmt.Errorf("node %s: add pod %q: %w", n.Name, name, err)
	}
	if err := n.lab.begin(); err != nil {
		return nil, err
	}
	defer n.lab.end()
	n.mu.Lock()
	defer n.mu.Unlock()
	if _, ok := n.pods[name]; ok {
		return nil, fmt.Errorf("node %s: add pod %q: pod exists", n.Name, name)
	}
	ons, err := n.lab.addNS(n.Name+"-"+name, podSysctls())
	if err != nil {
		return nil, fmt.Errorf("node %s: add pod %q: %w", n.Name, name, err)
	}
	p := &Pod{Name: name, NSName: ons.name, NS: ons.ns, Handle: ons.h, Node: n}
	n.pods[name] = p
	return p, nil
}

// NSPath is the pod namespace's path, what a runtime passes as CNI_NETNS.
func (p *Pod) NSPath() string { return netnsDir + "/" + p.NSName }

// SetAddrs records the addresses a CNI plugin gave a pod made by NewPodNS
// (invalid = none of that family) and the host side of its veth. Call it
// before the pod is used by Ping or TCPCheck, from one goroutine.
func (p *Pod) SetAddrs(ip, ip6 netip.Addr, hostIface string) {
	p.IP, p.IPv6, p.HostIface = ip, ip6, hostIface
}

// DeletePod removes a pod's namespace (which destroys its end of any veth,
// and so the veth) and forgets the pod. A pod already gone is no error.
func (n *Node) DeletePod(name string) error {
	if err := n.lab.begin(); err != nil {
		return err
	}
	defer n.lab.end()
	n.mu.Lock()
	p, ok := n.pods[name]
	delete(n.pods, name)
	n.mu.Unlock()
	if !ok {
		return nil
	}
	l := n.lab
	l.mu.Lock()
	var o *ownedNS
	for _, x := range l.owned {
		if x.name == p.NSName {
			o = x
		}
	}
	l.mu.Unlock()
	if o == nil {
		return errors.New("netlab: pod namespace not owned by the lab")
	}
	return l.disown(o)
}
