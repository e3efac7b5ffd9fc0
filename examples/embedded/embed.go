package main

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	clientv3 "go.etcd.io/etcd/client/v3"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/etcdstore"
	"github.com/flannelkit/flannel/rules"
	"github.com/flannelkit/flannel/vxlan"
)

// Node is what an embedding program (a K3s-style agent) already has when
// it starts flannel in-process.
type Node struct {
	Etcd       *clientv3.Client    // the embedder's store client (kubestore with a clientset: see below)
	NS         netns.NsHandle      // the node's network namespace
	Iface      string              // underlay interface; "" = the default route's
	SubnetFile string              // for the CNI plugin; "" = none
	Logger     *slog.Logger        // nil discards
	OnReady    func(flannel.State) // optional
}

// runFlannel is the whole embedding: store + vxlan + masquerade rules +
// Agent, every error returned, nothing global, stopped by ctx. With the
// Kubernetes store it is the same with kubestore.New(clientset, nodeName,
// ...) in place of etcdstore.New.
func runFlannel(ctx context.Context, n Node) error {
	store, err := etcdstore.New(n.Etcd, etcdstore.Options{Logger: n.Logger})
	if err != nil {
		return err
	}
	cfg, err := store.Config(ctx)
	if err != nil {
		return fmt.Errorf("flannel network config: %w", err)
	}
	be, err := vxlan.FromConfig(cfg)
	if err != nil {
		return err
	}
	h, err := netlink.NewHandleAt(n.NS)
	if err != nil {
		return fmt.Errorf("netlink handle: %w", err)
	}
	defer h.Close()
	opts := backend.InterfaceOptions{IPv4: cfg.EnableIPv4, IPv6: cfg.EnableIPv6}
	if n.Iface != "" {
		opts.Names = []string{n.Iface}
	}
	iface, err := backend.FindInterface(h, opts)
	if err != nil {
		return err
	}
	tr, err := rules.New(rules.Options{NS: n.NS, Masquerade: true, Forward: true, Logger: n.Logger})
	if err != nil {
		return err
	}
	agent, err := flannel.NewAgent(flannel.AgentOptions{
		Store: store, Backend: be, Iface: iface, Handle: h, NS: n.NS, Rules: tr,
		Logger: n.Logger, SubnetFile: n.SubnetFile, IPMasq: true, OnReady: n.OnReady,
	})
	if err != nil {
		return err
	}
	return agent.Run(ctx)
}
