// Command embedded shows how a program that already holds a Kubernetes
// clientset and knows its node name runs flannel in-process, the way K3s
// embeds it: runFlannel in embed.go is the whole wiring, about 40 lines,
// with errors returned instead of exits. This main only supplies the
// clientset, the node name and the current network namespace.
//
//	go run ./examples/embedded -kubeconfig ~/.kube/config -node $(hostname)
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/vishvananda/netns"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	flannel "github.com/flannelkit/flannel"
)

func main() {
	kubeconfig := flag.String("kubeconfig", "", "kubeconfig file")
	node := flag.String("node", "", "this node's name (required)")
	netConf := flag.String("net-conf", `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`, "net-conf.json")
	iface := flag.String("iface", "", "underlay interface (default: the default route's)")
	subnetFile := flag.String("subnet-file", "/run/flannel/subnet.env", "subnet.env for the CNI plugin")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := run(*kubeconfig, *node, *netConf, *iface, *subnetFile, log); err != nil {
		log.Error("embedded flannel failed", "error", err)
		os.Exit(1)
	}
}

func run(kubeconfig, node, netConf, iface, subnetFile string, log *slog.Logger) error {
	if node == "" {
		return fmt.Errorf("-node is required")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	rc, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return err
	}
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return err
	}
	ns, err := netns.Get()
	if err != nil {
		return fmt.Errorf("current network namespace: %w", err)
	}
	defer ns.Close()
	return runFlannel(ctx, Node{
		Client: client, Name: node, NetConf: []byte(netConf), NS: ns, Iface: iface, SubnetFile: subnetFile, Logger: log,
		OnReady: func(s flannel.State) { log.Info("flannel ready", "lease", s.Lease, "mtu", s.MTU) },
	})
}
