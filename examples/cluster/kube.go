package main

import (
	"context"
	"fmt"
	"log/slog"
	"math/big"
	"net/netip"
	"os"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/internal/kubetest"
	"github.com/flannelkit/flannel/kubestore"
	"github.com/flannelkit/flannel/lease"
)

// kubeStores runs the real kube-apiserver (built by hack/test.sh) and gives
// node i a Node object "node<i>" whose podCIDRs are the i-th subnets of
// the network, as the controller manager would assign them, and its own
// client and kube store.
func kubeStores(ctx context.Context, cfg lease.Config, log *slog.Logger) (func(*slog.Logger) (flannel.LeaseStore, error), func(), error) {
	bin, ok := kubetest.Binary()
	if !ok {
		return nil, nil, fmt.Errorf("-store kube: kube-apiserver not found at %s (hack/test.sh builds it)", bin)
	}
	srv, err := kubetest.New(kubetest.Options{Binary: bin})
	if err != nil {
		return nil, nil, fmt.Errorf("start kube-apiserver: %w", err)
	}
	closeAll := func() {
		if err := srv.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "cluster: kube-apiserver:", err)
		}
	}
	next := 0
	newStore := func(nlog *slog.Logger) (flannel.LeaseStore, error) {
		next++
		name := fmt.Sprintf("node%d", next-1)
		cs, err := kubernetes.NewForConfig(srv.AdminConfig())
		if err != nil {
			return nil, err
		}
		node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}}
		for _, p := range []struct {
			on      bool
			network netip.Prefix
			bits    int
		}{{cfg.EnableIPv4, cfg.Network, cfg.SubnetLen}, {cfg.EnableIPv6, cfg.IPv6Network, cfg.IPv6SubnetLen}} {
			if p.on {
				node.Spec.PodCIDRs = append(node.Spec.PodCIDRs, nthSubnet(p.network, p.bits, next).String())
			}
		}
		node.Spec.PodCIDR = node.Spec.PodCIDRs[0]
		if _, err := cs.CoreV1().Nodes().Create(ctx, node, metav1.CreateOptions{}); err != nil {
			return nil, fmt.Errorf("create Node %s: %w", name, err)
		}
		return kubestore.New(cs.CoreV1().Nodes(), kubestore.Options{NodeName: name, Config: cfg, SetNodeNetworkUnavailable: true, Logger: nlog})
	}
	log.Info("kube-apiserver running", "url", srv.URL)
	return newStore, closeAll, nil
}

// nthSubnet returns the n-th subnet of length bits in network.
func nthSubnet(network netip.Prefix, bits, n int) netip.Prefix {
	size := 128
	if network.Addr().Is4() {
		size = 32
	}
	a := network.Addr().As16()
	v := new(big.Int).SetBytes(a[:])
	v.Add(v, new(big.Int).Lsh(big.NewInt(int64(n)), uint(size-bits)))
	v.FillBytes(a[:])
	addr := netip.AddrFrom16(a)
	if size == 32 {
		addr = addr.Unmap()
	}
	return netip.PrefixFrom(addr, bits)
}
