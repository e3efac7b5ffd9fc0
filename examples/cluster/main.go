// Command cluster builds an N-node flannel cluster on this machine out of
// network namespaces, runs one Agent per node in this process, starts one pod
// per node, and checks that every pod reaches every other pod over ICMP and
// TCP. It prints a table and exits 0 only if every pair passed.
//
//	go run ./examples/cluster -nodes 3 -backend vxlan
//
// Pods get their addresses the way a kubelet's runtime gives them: through
// libcni with upstream flannel's conflist, so the flannel CNI plugin (this
// binary, linked as "flannel") reads the subnet.env the node's agent wrote
// and delegates to the real bridge and host-local plugins (-cni-bin-dir,
// default .cache/bin/cni as hack/test.sh builds them, then /opt/cni/bin).
//
// With -kubelet it is a real Kubernetes cluster instead (internal/kubecluster):
// the control plane, and on every node containerd, runc, a kubelet and
// kube-proxy; the pod network comes from applying deploy/kube-flannel.yaml
// with the flanneld image built here; -clean removes what a killed run left.
//
// It needs root and nothing else: no Kubernetes, no containers. With
// -store etcd (the default) it runs an etcd server inside this process and
// every node's agent talks to it over its own etcd client; -store memory
// shares one in-memory store instead; -store kube runs the real
// kube-apiserver (built by hack/test.sh) with a Node object per node.
package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"golang.org/x/sync/errgroup"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/etcdstore"
	"github.com/flannelkit/flannel/extension"
	"github.com/flannelkit/flannel/hostgw"
	"github.com/flannelkit/flannel/internal/cnilab"
	"github.com/flannelkit/flannel/internal/etcdtest"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/ipip"
	"github.com/flannelkit/flannel/ipsec"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/memstore"
	"github.com/flannelkit/flannel/vxlan"
	"github.com/flannelkit/flannel/wireguard"
)

func main() {
	if isPlugin() {
		os.Exit(servePlugin())
	}
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "cluster:", err)
		os.Exit(1)
	}
}

type options struct {
	nodes   int
	backend string
	store   string
	keep    bool
	verbose bool
	ipv6    bool
	ipv4    bool
	cniBin  string
	kubelet bool
	clean   bool
}

func run() error {
	var o options
	flag.IntVar(&o.nodes, "nodes", 3, "number of nodes")
	flag.StringVar(&o.backend, "backend", "vxlan", "dataplane: vxlan, host-gw, ipsec (needs a kernel with ESP), wireguard (needs a kernel with WireGuard), ipip (needs the ipip module) or extension (host-gw routes by ip commands, IPv4)")
	flag.StringVar(&o.store, "store", "etcd", "lease store: etcd (embedded server), memory, or kube (real kube-apiserver)")
	flag.BoolVar(&o.ipv4, "ipv4", true, "enable IPv4 pod network")
	flag.BoolVar(&o.ipv6, "ipv6", false, "enable IPv6 pod network")
	flag.BoolVar(&o.keep, "keep", false, "stay up until interrupted, to look around")
	flag.BoolVar(&o.verbose, "v", false, "log agent activity to stderr")
	flag.StringVar(&o.cniBin, "cni-bin-dir", "", "directory with the bridge, host-local, loopback and portmap CNI plugins (default .cache/bin/cni, then /opt/cni/bin)")
	flag.BoolVar(&o.kubelet, "kubelet", false, "a real Kubernetes cluster instead: control plane, and per node containerd, runc, kubelet and kube-proxy; flannel from kubectl apply of deploy/kube-flannel.yaml (binaries from hack/test.sh)")
	flag.BoolVar(&o.clean, "clean", false, "remove what a killed -kubelet run left (processes, cgroups, namespaces, sysctls) and exit")
	flag.Parse()
	if o.nodes < 1 || o.nodes > 200 {
		return fmt.Errorf("-nodes %d: want 1..200", o.nodes)
	}
	if o.store != "memory" && o.store != "etcd" && o.store != "kube" {
		return fmt.Errorf("-store %q: want \"etcd\", \"memory\" or \"kube\"", o.store)
	}
	if !o.ipv4 && !o.ipv6 {
		return errors.New("-ipv4=false and -ipv6=false: enable at least one family")
	}
	if os.Geteuid() != 0 {
		return errors.New("needs root (network namespaces)")
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	start := time.Now()
	if o.clean {
		return cleanKubelet()
	}
	if o.kubelet {
		return runKubelet(ctx, o, start)
	}

	logOut := io.Discard
	if o.verbose {
		logOut = os.Stderr
	}
	log := slog.New(slog.NewTextHandler(logOut, &slog.HandlerOptions{Level: slog.LevelDebug}))

	cfg, err := lease.ParseConfig(netConf(o))
	if err != nil {
		return err
	}
	newStore, closeStores, err := stores(ctx, o, cfg, log)
	if err != nil {
		return err
	}
	defer closeStores()
	reg := backend.NewRegistry()
	if err := reg.Register("host-gw", hostgw.FromConfig); err != nil {
		return err
	}
	if err := reg.Register(vxlan.Type, vxlan.FromConfig); err != nil {
		return err
	}
	if err := reg.Register(ipsec.Type, ipsec.FromConfig); err != nil {
		return err
	}
	// wireguard is built per node below: each node keeps its own key file.
	if err := errors.Join(reg.Register(ipip.Type, ipip.FromConfig), reg.Register(extension.Type, extension.FromConfig)); err != nil {
		return err
	}

	lab, err := netlab.New(netlab.Options{Nodes: o.nodes, IPv4: o.ipv4, IPv6: o.ipv6})
	if err != nil {
		return fmt.Errorf("build topology: %w", err)
	}
	defer func() {
		if err := lab.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "cluster: teardown:", err)
		}
	}()
	if o.backend == ipsec.Type {
		if err := ipsec.CheckKernel(lab.Nodes[0].Handle, ipsec.AESGCM128); err != nil {
			return fmt.Errorf("-backend ipsec cannot run on this kernel: %w (the ipsec tests run in a VM instead: go test ./ipsec -run TestVM)", err)
		}
	}
	if o.backend == wireguard.Type {
		if err := wireguard.CheckKernel(lab.Nodes[0].Handle); err != nil {
			return fmt.Errorf("-backend wireguard cannot run on this kernel: %w (the wireguard tests run in a VM instead: go test ./wireguard -run TestVM)", err)
		}
	}

	tmp, err := os.MkdirTemp("", "flannel-cluster-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	bin, err := cniBinDir(tmp, o.cniBin)
	if err != nil {
		return err
	}
	rts, err := runtimes(tmp, bin, lab)
	if err != nil {
		return err
	}

	agents := make([]*flannel.Agent, len(lab.Nodes))
	for i, n := range lab.Nodes {
		store, err := newStore(log.With("node", n.Name))
		if err != nil {
			return fmt.Errorf("node %s: %w", n.Name, err)
		}
		be, err := newBackend(reg, cfg, filepath.Join(tmp, n.Name))
		if err != nil {
			return err
		}
		iface, err := backend.FindInterface(n.Handle, backend.InterfaceOptions{IPv4: o.ipv4, IPv6: o.ipv6})
		if err != nil {
			return fmt.Errorf("node %s: %w", n.Name, err)
		}
		agents[i], err = flannel.NewAgent(flannel.AgentOptions{
			Store:   store,
			Backend: be,
			Iface:   iface,
			Handle:  n.Handle,
			NS:      n.NS,
			Logger:  log.With("node", n.Name),
			// Where this node's CNI plugin reads it; the demo's pods
			// only talk to each other, so nothing is masqueraded.
			SubnetFile: rts[i].Path(cnilab.SubnetFile),
			IPMasq:     true,
		})
		if err != nil {
			return fmt.Errorf("node %s: %w", n.Name, err)
		}
	}

	runCtx, cancelAgents := context.WithCancel(ctx)
	g, gctx := errgroup.WithContext(runCtx)
	for _, a := range agents {
		g.Go(func() error { return a.Run(gctx) })
	}
	// The agents stop, and their goroutines are joined, on every return path.
	defer func() {
		cancelAgents()
		if err := g.Wait(); err != nil {
			fmt.Fprintln(os.Stderr, "cluster: agent:", err)
		}
	}()

	readyCtx, cancelReady := context.WithTimeout(gctx, 60*time.Second)
	defer cancelReady()
	for i, a := range agents {
		select {
		case <-a.Ready():
		case <-readyCtx.Done():
			return fmt.Errorf("node %s not ready: %w", lab.Nodes[i].Name, context.Cause(readyCtx))
		}
	}
	// Every agent is ready; wait until each has programmed all the others.
	for i, a := range agents {
		for a.State().Peers < len(agents)-1 {
			select {
			case <-readyCtx.Done():
				return fmt.Errorf("node %s sees %d of %d peers", lab.Nodes[i].Name, a.State().Peers, len(agents)-1)
			case <-time.After(50 * time.Millisecond):
			}
		}
	}

	// Pods are started the way a node's runtime starts them: CNI ADD
	// through libcni with upstream's conflist.
	pods := make([]*netlab.Pod, len(lab.Nodes))
	defer func() {
		dctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := delPods(dctx, rts, pods); err != nil {
			fmt.Fprintln(os.Stderr, "cluster: cni del:", err)
		}
	}()
	for i, n := range lab.Nodes {
		pods[i], _, err = rts[i].AddPod(readyCtx, n, "pod0")
		if err != nil {
			return fmt.Errorf("node %s: %w", n.Name, err)
		}
	}
	fmt.Printf("pods wired by the flannel CNI plugin (libcni, upstream's conflist) delegating to bridge and host-local in %s\n\n", bin)

	ok := checkAll(ctx, os.Stdout, lab, agents, pods)
	fmt.Printf("\n%d nodes, backend %s, store %s: %s in %s\n", o.nodes, o.backend, o.store,
		map[bool]string{true: "all pairs reachable", false: "SOME PAIRS FAILED"}[ok], time.Since(start).Round(time.Millisecond))

	if o.keep {
		fmt.Println("\nStaying up until interrupted. Enter a pod with:")
		for _, p := range pods {
			fmt.Printf("  ip netns exec %s sh    # %s\n", p.NSName, addrs(p.IP, p.IPv6))
		}
		<-ctx.Done()
	}
	if !ok {
		return errors.New("not every pod pair could reach each other")
	}
	return nil
}

// stores returns a function giving each node its lease store, and one that
// releases what they hold. With etcd: an embedded server, one client per
// node (as separate machines would have), the network config written once.
func stores(ctx context.Context, o options, cfg lease.Config, log *slog.Logger) (func(*slog.Logger) (flannel.LeaseStore, error), func(), error) {
	if o.store == "memory" {
		mem := memstore.New(cfg, memstore.Options{Logger: log})
		return func(*slog.Logger) (flannel.LeaseStore, error) { return mem, nil }, func() {}, nil
	}
	if o.store == "kube" {
		return kubeStores(ctx, cfg, log)
	}
	srv, err := etcdtest.New(etcdtest.Options{})
	if err != nil {
		return nil, nil, fmt.Errorf("start embedded etcd: %w", err)
	}
	var clients []*clientv3.Client
	closeAll := func() {
		for _, c := range clients {
			c.Close()
		}
		if err := srv.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "cluster: etcd:", err)
		}
	}
	newEtcdStore := func(nlog *slog.Logger) (*etcdstore.Store, error) {
		c, err := etcdstore.NewClient(etcdstore.ClientOptions{Endpoints: srv.Endpoints, Logger: nlog})
		if err != nil {
			return nil, err
		}
		clients = append(clients, c)
		return etcdstore.New(c, etcdstore.Options{Logger: nlog})
	}
	admin, err := newEtcdStore(log)
	if err == nil {
		err = admin.PutConfig(ctx, netConf(o))
	}
	if err != nil {
		closeAll()
		return nil, nil, fmt.Errorf("embedded etcd: %w", err)
	}
	newStore := func(nlog *slog.Logger) (flannel.LeaseStore, error) { return newEtcdStore(nlog) }
	return newStore, closeAll, nil
}

// newBackend builds a node's backend; a wireguard node keeps its private
// key in dir, as flanneld keeps it in /run/flannel/wgkey.
func newBackend(reg *backend.Registry, cfg lease.Config, dir string) (flannel.Backend, error) {
	if cfg.BackendType == wireguard.Type {
		return wireguard.Constructor(wireguard.Options{KeyFile: filepath.Join(dir, "wgkey")})(cfg)
	}
	return reg.New(cfg)
}

func netConf(o options) []byte {
	conf := `{"EnableIPv4": ` + fmt.Sprint(o.ipv4) + `, "EnableIPv6": ` + fmt.Sprint(o.ipv6)
	if o.ipv4 {
		conf += `, "Network": "10.244.0.0/16"`
	}
	if o.ipv6 {
		conf += `, "IPv6Network": "fd00:10:244::/56"`
	}
	if o.backend == ipsec.Type {
		// A throwaway cluster secret for this run.
		psk := make([]byte, ipsec.MinPSKLen/2)
		rand.Read(psk)
		return []byte(conf + `, "Backend": {"Type": "ipsec", "PSK": "` + hex.EncodeToString(psk) + `"}}`)
	}
	if o.backend == extension.Type { // upstream's host-gw example, IPv4
		return []byte(conf + `, "Backend": {"Type": "extension", "SubnetAddCommand": "ip route replace $SUBNET via $PUBLIC_IP dev eth0", "SubnetRemoveCommand": "ip route del $SUBNET via $PUBLIC_IP dev eth0"}}`)
	}
	return []byte(conf + `, "Backend": {"Type": "` + o.backend + `"}}`)
}

// checkAll checks every ordered pod pair over ICMP and TCP (per family) and
// prints the node table and the reachability matrix.
func checkAll(ctx context.Context, out io.Writer, lab *netlab.Lab, agents []*flannel.Agent, pods []*netlab.Pod) bool {
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "NODE\tSUBNET\tPUBLIC IP\tMTU\tPOD")
	for i, n := range lab.Nodes {
		st := agents[i].State()
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\n", n.Name, st.Lease, addrs(st.Lease.Attrs.PublicIP, st.Lease.Attrs.PublicIPv6), st.MTU, addrs(pods[i].IP, pods[i].IPv6))
	}
	tw.Flush()

	res := make([][]error, len(pods))
	g, gctx := errgroup.WithContext(ctx)
	g.SetLimit(8)
	for i := range pods {
		res[i] = make([]error, len(pods))
		for j := range pods {
			if i == j {
				continue
			}
			g.Go(func() error {
				res[i][j] = checkPair(gctx, pods[i], pods[j])
				return nil
			})
		}
	}
	_ = g.Wait()

	fmt.Fprintln(out)
	names := make([]string, len(lab.Nodes))
	for i, n := range lab.Nodes {
		names[i] = n.Name
	}
	return printMatrix(out, names, res)
}

// printMatrix prints the reachability matrix of res[from][to] (nil: ok)
// and the failures under it, and reports whether every pair passed.
func printMatrix(out io.Writer, names []string, res [][]error) bool {
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "FROM \\ TO\t"+strings.Join(names, "\t"))
	ok := true
	var failures []string
	for i, from := range names {
		row := from
		for j, to := range names {
			switch {
			case i == j:
				row += "\t-"
			case res[i][j] == nil:
				row += "\tok"
			default:
				ok = false
				row += "\tFAIL"
				failures = append(failures, fmt.Sprintf("%s -> %s: %v", from, to, res[i][j]))
			}
		}
		fmt.Fprintln(tw, row)
	}
	tw.Flush()
	for _, f := range failures {
		fmt.Fprintln(out, "  ", f)
	}
	return ok
}

// checkPair sends ICMP echo and a TCP payload from one pod to another, on
// every address family the destination has.
func checkPair(ctx context.Context, from, to *netlab.Pod) error {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	var errs []error
	for _, dst := range []netip.Addr{to.IP, to.IPv6} {
		if !dst.IsValid() {
			continue
		}
		if err := from.Ping(ctx, dst); err != nil {
			errs = append(errs, fmt.Errorf("icmp %s: %w", dst, err))
		}
		if err := from.TCPCheck(ctx, to, dst); err != nil {
			errs = append(errs, fmt.Errorf("tcp %s: %w", dst, err))
		}
	}
	return errors.Join(errs...)
}

func addrs(a, b netip.Addr) string {
	switch {
	case a.IsValid() && b.IsValid():
		return a.String() + "," + b.String()
	case b.IsValid():
		return b.String()
	default:
		return a.String()
	}
}
