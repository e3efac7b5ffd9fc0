package netlab

import (
	"fmt"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
)

// AttachHost connects the caller's own namespace to segment 0: a veth
// "<lab>h" there with ip (a free address of SegmentPrefix(0), e.g. .250)
// whose peer is on the segment's bridge, so that processes of the host
// (a kube-apiserver, a test client) and the nodes reach each other. It is
// the one thing a Lab creates outside its namespaces; it goes when the
// segment's namespace is deleted (Close, Sweep). Only one Lab at a time
// should be attached: each uses the same underlay prefix.
func (l *Lab) AttachHost(ip netip.Addr) (string, error) {
	if err := l.begin(); err != nil {
		return "", err
	}
	defer l.end()
	if !SegmentPrefix(0).Contains(ip) {
		return "", fmt.Errorf("netlab: host address %s is not in %s", ip, SegmentPrefix(0))
	}
	l.mu.Lock()
	var seg *ownedNS
	for _, o := range l.owned {
		if o.name == l.NSName("s0") {
			seg = o
		}
	}
	l.mu.Unlock()
	if seg == nil {
		return "", fmt.Errorf("netlab: no segment 0")
	}
	self, err := netns.Get()
	if err != nil {
		return "", fmt.Errorf("netlab: own namespace: %w", err)
	}
	defer self.Close()
	h, err := netlink.NewHandleAt(self)
	if err != nil {
		return "", fmt.Errorf("netlab: %w", err)
	}
	defer h.Close()
	name := l.Name + "h"
	link, err := l.attach(h, "host", name, seg, "host")
	if err != nil {
		return "", err
	}
	if err := addAddr(h, link, netip.PrefixFrom(ip, SegmentPrefix(0).Bits())); err != nil {
		return "", fmt.Errorf("netlab: %s: %w", name, err)
	}
	return name, nil
}
