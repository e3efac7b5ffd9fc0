// Command embedded shows how a program that already holds a store client
// and knows its node runs flannel in-process (the way K3s embeds it):
// runFlannel in embed.go is the whole wiring, about 40 lines, with errors
// returned instead of exits. This main only supplies an etcd client and
// the current network namespace.
//
//	go run ./examples/embedded -etcd-endpoints http://127.0.0.1:2379
//
// It uses the etcd store because the Kubernetes store had not landed when
// it was written; swapping in kubestore changes one call.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/vishvananda/netns"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/etcdstore"
)

func main() {
	endpoints := flag.String("etcd-endpoints", "http://127.0.0.1:2379", "comma-separated etcd endpoints")
	iface := flag.String("iface", "", "underlay interface (default: the default route's)")
	subnetFile := flag.String("subnet-file", "/run/flannel/subnet.env", "subnet.env for the CNI plugin")
	flag.Parse()
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	if err := run(*endpoints, *iface, *subnetFile, log); err != nil {
		log.Error("embedded flannel failed", "error", err)
		os.Exit(1)
	}
}

func run(endpoints, iface, subnetFile string, log *slog.Logger) error {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	client, err := etcdstore.NewClient(etcdstore.ClientOptions{Endpoints: strings.Split(endpoints, ","), Logger: log})
	if err != nil {
		return err
	}
	defer client.Close()
	ns, err := netns.Get()
	if err != nil {
		return fmt.Errorf("current network namespace: %w", err)
	}
	defer ns.Close()
	return runFlannel(ctx, Node{
		Etcd: client, NS: ns, Iface: iface, SubnetFile: subnetFile, Logger: log,
		OnReady: func(s flannel.State) { log.Info("flannel ready", "lease", s.Lease, "mtu", s.MTU) },
	})
}
