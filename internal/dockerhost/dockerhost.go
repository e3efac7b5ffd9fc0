// Package dockerhost runs flannel the way it runs without Kubernetes: on
// Docker hosts with etcd as the store. Each host is a netlab node
// namespace with its own mount namespace and cgroup, running the example
// flanneld, its docker-opts step and a real dockerd (Debian's docker.io),
// started as the units in examples/systemd start them (read from those
// files), with its own data-root, exec-root, pidfile, API socket and its
// own containerd (dockerd's managed one, under its exec-root: a host's
// containers, shims and state go with it, and no host shares a socket
// with another or with a kubecluster node's containerd). All hosts
// share one embedded etcd (internal/etcdtest), reached through a relay at
// the lab router's address. Images come from `docker import` of a rootfs
// made here (busybox-static and the files the caller adds); nothing is
// pulled.
//
// It is test infrastructure: it needs root, dockerd, the docker CLI,
// docker-init, nsenter and unshare. Close removes everything; Sweep
// removes what a killed run left (processes, cgroups, files, namespaces).
package dockerhost

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/vishvananda/netns"

	"github.com/flannelkit/flannel/internal/etcdtest"
	"github.com/flannelkit/flannel/internal/netlab"
)

// Image is the tag of the test image every host imports.
const Image = "dockerhost/busybox:1"

// EtcdPort is where the hosts reach etcd, at netlab.RouterIP(0).
const EtcdPort = 2379

// Options describe a cluster of Docker hosts.
type Options struct {
	// Hosts is the number of hosts, 1..10 (required).
	Hosts int
	// Flanneld is the example flanneld binary (required).
	Flanneld string
	// Units is the directory of the systemd units (required:
	// examples/systemd).
	Units string
	// Network is the flannel network config written to etcd (required),
	// e.g. {"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}.
	Network string
	// Files are added to the image: image path -> host file. Optional.
	Files map[string]string
}

// Cluster is a running set of Docker hosts.
type Cluster struct {
	Lab   *netlab.Lab
	Etcd  *etcdtest.Server
	Hosts []*Host

	opts      Options
	units     Units
	root      string
	dockerd   string
	dockerCLI string
	stopRelay func()
	imageTar  string
}

// StateDir holds one directory per live cluster (named after its lab),
// with its hosts' files and the owner's pid for Sweep.
const StateDir = "/run/flannelkit-dockerhost"

// New builds the lab, etcd with the network config, and each host's
// namespaces; it starts neither flanneld nor dockerd (see Start). On
// failure everything is torn down again.
func New(ctx context.Context, o Options) (c *Cluster, err error) {
	if o.Hosts < 1 || o.Hosts > 10 || o.Flanneld == "" || o.Units == "" || o.Network == "" {
		return nil, errors.New("dockerhost: Hosts (1..10), Flanneld, Units and Network are required")
	}
	c = &Cluster{opts: o}
	defer func() {
		if err != nil {
			err = errors.Join(err, c.Close())
		}
	}()
	if c.units, err = ReadUnits(o.Units); err != nil {
		return c, err
	}
	if c.dockerd, c.dockerCLI, err = Tools(); err != nil {
		return c, err
	}
	if err := Sweep(); err != nil {
		return c, fmt.Errorf("dockerhost: sweep what killed runs left: %w", err)
	}
	if c.Lab, err = netlab.New(netlab.Options{Nodes: o.Hosts, IPv4: true}); err != nil {
		return c, err
	}
	c.root = filepath.Join(StateDir, c.Lab.Name)
	if err := os.MkdirAll(c.root, 0o755); err != nil {
		return c, err
	}
	if err := writeOwner(c.root); err != nil {
		return c, err
	}
	if err := c.startEtcd(ctx); err != nil {
		return c, err
	}
	if err := c.buildImage(); err != nil {
		return c, err
	}
	for _, ln := range c.Lab.Nodes {
		h := &Host{Name: ln.Name, Lab: ln, Root: filepath.Join(c.root, ln.Name), c: c, cgroup: cgroupPrefix + c.Lab.Name + "-" + ln.Name}
		c.Hosts = append(c.Hosts, h)
		if err := os.MkdirAll(h.Root, 0o755); err != nil {
			return c, err
		}
		if err := h.startHolder(); err != nil {
			return c, err
		}
	}
	return c, nil
}

// Tools finds dockerd and the docker CLI of Debian's docker.io (a docker
// CLI elsewhere on PATH may be another version).
func Tools() (dockerd, cli string, err error) {
	if dockerd, err = exec.LookPath("dockerd"); err != nil {
		return "", "", fmt.Errorf("dockerhost: dockerd: %w (Debian package docker.io)", err)
	}
	cli = "/usr/bin/docker"
	if _, err := os.Stat(cli); err != nil {
		if cli, err = exec.LookPath("docker"); err != nil {
			return "", "", fmt.Errorf("dockerhost: docker CLI: %w (Debian package docker.io)", err)
		}
	}
	return dockerd, cli, nil
}

func (c *Cluster) startEtcd(ctx context.Context) error {
	var err error
	if c.Etcd, err = etcdtest.New(etcdtest.Options{Dir: filepath.Join(c.root, "etcd")}); err != nil {
		return err
	}
	cl, err := c.Etcd.Client()
	if err != nil {
		return err
	}
	defer cl.Close()
	if _, err := cl.Put(ctx, "/coreos.com/network/config", c.opts.Network); err != nil {
		return fmt.Errorf("dockerhost: write network config: %w", err)
	}
	target := strings.TrimPrefix(c.Etcd.Endpoints[0], "http://")
	rt, err := netns.GetFromName(c.Lab.NSName("rt"))
	if err != nil {
		return err
	}
	defer rt.Close()
	c.stopRelay, err = netlab.Relay(rt, netip.AddrPortFrom(netlab.RouterIP(0), EtcdPort).String(), target)
	return err
}

// EtcdEndpoint is etcd's URL as the hosts reach it.
func (c *Cluster) EtcdEndpoint() string {
	return "http://" + netip.AddrPortFrom(netlab.RouterIP(0), EtcdPort).String()
}

// EtcdClient is a client of the cluster's etcd; the caller closes it.
func (c *Cluster) EtcdClient() (*clientv3.Client, error) { return c.Etcd.Client() }

// Start runs flanneld.service on every host, then docker.service on
// every host: the units' order.
func (c *Cluster) Start(ctx context.Context) error {
	for _, h := range c.Hosts {
		if err := h.StartFlanneld(ctx); err != nil {
			return err
		}
	}
	for _, h := range c.Hosts {
		if err := h.StartDocker(ctx); err != nil {
			return err
		}
	}
	return nil
}

// Close tears everything down. It is safe to call more than once.
func (c *Cluster) Close() error {
	var errs []error
	for _, h := range c.Hosts {
		errs = append(errs, h.close())
	}
	c.Hosts = nil
	if c.stopRelay != nil {
		c.stopRelay()
		c.stopRelay = nil
	}
	if c.Etcd != nil {
		errs = append(errs, c.Etcd.Close())
		c.Etcd = nil
	}
	if c.Lab != nil {
		errs = append(errs, c.Lab.Close())
		c.Lab = nil
	}
	if c.root != "" {
		errs = append(errs, os.RemoveAll(c.root))
		c.root = ""
	}
	return errors.Join(errs...)
}
