package cnilab

import (
	"context"
	"errors"
	"fmt"
	"net/netip"

	current "github.com/containernetworking/cni/pkg/types/100"

	"github.com/flannelkit/flannel/internal/netlab"
)

// IfName is the pod interface the runtime asks for.
const IfName = "eth0"

// AddPod creates an empty pod namespace on node nd and runs the conflist's
// ADD for it (container ID "<lab node>-<name>"), as a runtime does when it
// starts a pod sandbox; the pod's addresses come from the result. On
// failure the namespace is removed again.
func (n *Node) AddPod(ctx context.Context, nd *netlab.Node, name string) (*netlab.Pod, *current.Result, error) {
	p, err := nd.NewPodNS(name)
	if err != nil {
		return nil, nil, err
	}
	res, err := n.Add(ctx, ContainerID(p), p.NSPath(), IfName)
	if err != nil {
		return nil, nil, errors.Join(fmt.Errorf("pod %s: cni add: %w", name, err), nd.DeletePod(name))
	}
	v4, v6, host := Addrs(res)
	p.SetAddrs(v4, v6, host)
	return p, res, nil
}

// DelPod runs the conflist's DEL for a pod and then removes its namespace,
// as a runtime does when it stops a pod sandbox.
func (n *Node) DelPod(ctx context.Context, p *netlab.Pod) error {
	if err := n.Del(ctx, ContainerID(p), p.NSPath(), IfName); err != nil {
		return fmt.Errorf("pod %s: cni del: %w", p.Name, err)
	}
	return p.Node.DeletePod(p.Name)
}

// ContainerID is the container ID a pod is added with.
func ContainerID(p *netlab.Pod) string { return p.NSName }

// Addrs returns the pod's IPv4 and IPv6 addresses and the host-side veth
// from a result: the addresses on the interface in the sandbox, and the
// interface outside it that is not the first (the bridge).
func Addrs(res *current.Result) (v4, v6 netip.Addr, hostIface string) {
	for _, ip := range res.IPs {
		if ip.Interface == nil || *ip.Interface < 0 || *ip.Interface >= len(res.Interfaces) || res.Interfaces[*ip.Interface].Sandbox == "" {
			continue
		}
		a, ok := netip.AddrFromSlice(ip.Address.IP)
		if !ok {
			continue
		}
		a = a.Unmap()
		if a.Is4() && !v4.IsValid() {
			v4 = a
		} else if a.Is6() && !v6.IsValid() {
			v6 = a
		}
	}
	for i, itf := range res.Interfaces {
		if i > 0 && itf.Sandbox == "" && hostIface == "" {
			hostIface = itf.Name
		}
	}
	return v4, v6, hostIface
}
