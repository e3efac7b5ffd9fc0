package main

import (
	"context"
	"fmt"
	"log/slog"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"k8s.io/client-go/kubernetes"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/kubestore"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/rules"
	"github.com/flannelkit/flannel/vxlan"
)

// Node is what an embedding program (a K3s-style agent) already has when
// it starts flannel in-process.
type Node struct {
	Client     kubernetes.Interface // the embedder's clientset
	Name       string               // this node's Node object
	NetConf    []byte               // net-conf.json
	NS         netns.NsHandle       // the node's network namespace
	Iface      string               // underlay interface; "" = the default route's
	SubnetFile string               // for the CNI plugin; "" = none
	Logger     *slog.Logger         // nil discards
	OnReady    func(flannel.State)  // optional
}

// runFlannel is the whole embedding: Kubernetes store + vxlan +
// masquerade rules + Agent, every error returned, nothing global, stopped
// by ctx. With etcd it is the same with etcdstore.New in place of
// kubestore.New.
func runFlannel(ctx context.Context, n Node) error {
	cfg, err := lease.ParseConfig(n.NetConf)
	if err != nil {
		return fmt.Errorf("flannel network config: %w", err)
	}
	store, err := kubestore.New(n.Client.CoreV1().Nodes(), kubestore.Options{NodeName: n.Name, Config: cfg, Logger: n.Logger})
	if err != nil {
		return err
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
