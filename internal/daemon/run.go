package daemon

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	clientv3 "go.etcd.io/etcd/client/v3"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/alloc"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/etcdstore"
	"github.com/flannelkit/flannel/extension"
	"github.com/flannelkit/flannel/hostgw"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/internal/retry"
	"github.com/flannelkit/flannel/ipip"
	"github.com/flannelkit/flannel/ipsec"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/rules"
	"github.com/flannelkit/flannel/vxlan"
	"github.com/flannelkit/flannel/wireguard"
)

// Registry returns the backends this daemon links, set up for c (the
// wireguard key file).
func Registry(c Config) (*backend.Registry, error) {
	r := backend.NewRegistry()
	for typ, c := range map[string]backend.Constructor{
		vxlan.Type:     vxlan.FromConfig,
		hostgw.Type:    hostgw.FromConfig,
		ipsec.Type:     ipsec.FromConfig,
		wireguard.Type: wireguard.Constructor(wireguard.Options{KeyFile: c.WireguardKeyFile}),
		alloc.Type:     alloc.FromConfig,
		ipip.Type:      ipip.FromConfig,
		// The added peers live next to subnet.env's default, on tmpfs.
		extension.Type: extension.Constructor(extension.Options{StateDir: "/run/flannel"}),
	} {
		if err := r.Register(typ, c); err != nil {
			return nil, err
		}
	}
	return r, nil
}

// NewLogger returns the daemon's logger for c (--log-format, -v).
func NewLogger(c Config, w interface{ Write([]byte) (int, error) }) *slog.Logger {
	lvl := slog.LevelInfo
	if c.Verbosity > 0 {
		lvl = slog.LevelDebug
	}
	o := &slog.HandlerOptions{Level: lvl}
	if c.LogFormat == "json" {
		return slog.New(slog.NewJSONHandler(w, o))
	}
	return slog.New(slog.NewTextHandler(w, o))
}

// Hooks are the process-level callbacks of Run.
type Hooks struct {
	// Ready, when set, is called once the node is ready (lease held,
	// subnet.env written, rules in place, the first peer set programmed),
	// e.g. to tell systemd (sd_notify READY=1). It must not block.
	Ready func()
}

// Run runs the daemon in the network namespace of the calling process
// until ctx ends, then returns nil with the datapath left in place. With
// c.Cleanup it removes this node's devices, routes, rules, lease and
// subnet file instead, and returns.
func Run(ctx context.Context, c Config, log *slog.Logger, hooks Hooks) error {
	m := NewMetrics()
	if c.HealthzPort > 0 && !c.Cleanup {
		stop, err := serve(c, m, log)
		if err != nil {
			return err
		}
		defer stop()
	}
	ns, err := netns.Get()
	if err != nil {
		return fmt.Errorf("open current network namespace: %w", err)
	}
	defer ns.Close()
	// A handle in the current namespace without setns, which needs
	// CAP_SYS_ADMIN: the manifests give the daemon only NET_ADMIN and NET_RAW.
	nh, err := nlsafe.Open(ns)
	if err != nil {
		return err
	}
	h := nh.Handle
	defer h.Close()

	st, err := openStore(ctx, c, log, m)
	if err != nil {
		return err
	}
	defer st.close()
	store := st.store
	c = withStoredPublicIPs(ctx, c, st, log)

	cfg, err := waitConfig(ctx, store, st.where, log)
	if err != nil || ctx.Err() != nil {
		return err
	}
	if !c.Cleanup {
		if err := checkBrNetfilter(cfg, "/proc/sys"); err != nil {
			return err
		}
	}
	be, iface, err := findBackend(c, cfg, h, log)
	if err != nil {
		return err
	}
	tr, err := newRules(c, ns, log)
	if err != nil {
		return err
	}
	if st.expiry != nil {
		m.SetLeaseExpiry(st.expiry)
	}
	opts := flannel.AgentOptions{
		Store: store, Backend: be, Iface: iface, Handle: h, NS: ns,
		Logger: log, SubnetFile: c.SubnetFile, IPMasq: c.IPMasq,
	}
	if tr != nil {
		opts.Rules = tr // never a typed nil in the interface
	}
	var bh *blackholes
	if c.IPBlackholeRoute && !c.Cleanup {
		bh = &blackholes{h: h, ns: ns, interval: c.IPTablesResync, log: log.With("component", "blackhole")}
		defer bh.start(ctx)()
	}
	opts.OnReady = onReady(bh, hooks)
	m.Hook(&opts)
	agent, err := flannel.NewAgent(opts)
	if err != nil {
		return err
	}
	m.SetAgent(agent)

	if c.Cleanup {
		return cleanup(ctx, c, store, h, iface, agent, log)
	}

	runErr := agent.Run(ctx)
	m.RunDone(runErr)
	return runErr
}

// withStoredPublicIPs returns c with the public addresses stored for this
// node (Node annotations node-public-ip and node-public-ipv6) in place of
// --public-ip and --public-ipv6, as upstream does at start. A failed read
// keeps the flags, with a warning.
func withStoredPublicIPs(ctx context.Context, c Config, st *storeSetup, log *slog.Logger) Config {
	if st.publicIPs == nil {
		return c
	}
	v4, v6, err := st.publicIPs(ctx)
	if err != nil {
		log.Warn("public-ip annotations not read; using the flags", "error", err)
		return c
	}
	if v4.IsValid() {
		log.Info("public IP from the node-public-ip annotation", "ip", v4, "flag", c.PublicIP)
		c.PublicIP = v4
	}
	if v6.IsValid() {
		log.Info("public IPv6 from the node-public-ipv6 annotation", "ip", v6, "flag", c.PublicIPv6)
		c.PublicIPv6 = v6
	}
	return c
}

// onReady is the Agent's OnReady: the blackhole routes (when kept), then
// the process's Ready hook.
func onReady(bh *blackholes, hooks Hooks) func(flannel.State) {
	return func(st flannel.State) {
		if bh != nil {
			bh.ready(st)
		}
		if hooks.Ready != nil {
			hooks.Ready()
		}
	}
}

// openStore builds the lease store the flags choose: the Kubernetes API
// (--kube-subnet-mgr) or etcd, whose renewals feed m.
func openStore(ctx context.Context, c Config, log *slog.Logger, m *Metrics) (*storeSetup, error) {
	if c.KubeSubnetMgr {
		return newKubeStore(ctx, c, log)
	}
	return newEtcdStore(c, log, m.LeaseRenewed)
}

// findBackend builds the backend that cfg names and finds the external
// interface as the --iface* and --public-ip* flags say.
func findBackend(c Config, cfg lease.Config, h *netlink.Handle, log *slog.Logger) (flannel.Backend, flannel.ExternalInterface, error) {
	reg, err := Registry(c)
	if err != nil {
		return nil, flannel.ExternalInterface{}, err
	}
	be, err := reg.New(cfg)
	if err != nil {
		return nil, flannel.ExternalInterface{}, fmt.Errorf("network config: %w", err)
	}
	iface, err := backend.FindInterface(h, backend.InterfaceOptions{
		Names: c.Ifaces, Regexes: c.IfaceRegexes, CanReach: c.IfaceCanReach,
		PublicIP: c.PublicIP, PublicIPv6: c.PublicIPv6,
		IPv4: cfg.EnableIPv4, IPv6: cfg.EnableIPv6,
	})
	if err != nil {
		return nil, flannel.ExternalInterface{}, fmt.Errorf("find external interface: %w", err)
	}
	log.Info("using interface", "iface", iface.Name, "ip", iface.IP, "ipv6", iface.IPv6,
		"public_ip", iface.PublicIP, "public_ipv6", iface.PublicIPv6, "backend", be.Type())
	return be, iface, nil
}

// newRules returns the traffic rules manager when --ip-masq or
// --iptables-forward-rules asks for rules, or for --cleanup (to remove
// them); nil otherwise.
func newRules(c Config, ns netns.NsHandle, log *slog.Logger) (*rules.Manager, error) {
	if !c.IPMasq && !c.IPTablesForwardRules && !c.Cleanup {
		return nil, nil
	}
	return rules.New(rules.Options{
		NS: ns, Masquerade: c.IPMasq, Forward: c.IPTablesForwardRules,
		DisableRandomFully: c.IPMasqRandomFullyDisable, NoIPv6Masquerade: !c.IPMasqIPv6,
		ResyncPeriod: c.IPTablesResync, Logger: log.With("component", "rules"),
	})
}

// serve starts the health/metrics server; stop shuts it down and waits.
func serve(c Config, m *Metrics, log *slog.Logger) (stop func(), err error) {
	addr := net.JoinHostPort(c.HealthzIP.String(), strconv.Itoa(c.HealthzPort))
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("healthz listener on %s: %w", addr, err)
	}
	srv := &http.Server{Handler: m.Handler(), ReadHeaderTimeout: 10 * time.Second}
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	log.Info("serving /healthz, /readyz and /metrics", "addr", addr)
	return func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		_ = srv.Shutdown(ctx)
		if err := <-done; err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Warn("healthz server", "error", err)
		}
	}, nil
}

// storeSetup is a lease store the daemon built from its flags.
type storeSetup struct {
	store flannel.LeaseStore
	// where names the config's location for logs.
	where string
	// publicIPs reads public addresses stored for this node (the kube
	// store's node-public-ip(v6) annotations); nil when the store has none.
	publicIPs func(ctx context.Context) (v4, v6 netip.Addr, err error)
	// expiry reports when the node's lease expires; nil when leases do not
	// expire.
	expiry func(ctx context.Context, own lease.Lease) (time.Time, error)
	close  func()
}

// newEtcdStore connects to etcd as the --etcd-* flags say; onRenew is
// called after each renewal of the node's lease.
func newEtcdStore(c Config, log *slog.Logger, onRenew func(key string)) (*storeSetup, error) {
	client, err := etcdstore.NewClient(etcdstore.ClientOptions{
		Endpoints: c.EtcdEndpoints,
		CAFile:    c.EtcdCAFile, CertFile: c.EtcdCertFile, KeyFile: c.EtcdKeyFile,
		Username: c.EtcdUsername, Password: c.EtcdPassword,
		Logger: log.With("component", "etcd-client"),
	})
	if err != nil {
		return nil, err
	}
	store, err := etcdstore.New(client, etcdstore.Options{
		Prefix:      c.EtcdPrefix,
		RenewMargin: c.SubnetLeaseRenewMargin,
		Logger:      log.With("component", "etcd-store"),
		OnRenew:     onRenew,
	})
	if err != nil {
		client.Close()
		return nil, err
	}
	return &storeSetup{
		store:  store,
		where:  "etcd " + store.Prefix() + "/config",
		expiry: leaseExpiry(client, store),
		close:  func() { client.Close() },
	}, nil
}

// waitConfig reads the network config, waiting (as upstream) while it is
// missing or invalid; it returns when ctx ends.
func waitConfig(ctx context.Context, store flannel.LeaseStore, where string, log *slog.Logger) (lease.Config, error) {
	d := 500 * time.Millisecond
	for {
		cfg, err := store.Config(ctx)
		if err == nil {
			if err = cfg.Validate(); err == nil {
				return cfg, nil
			}
		}
		if ctx.Err() != nil {
			return lease.Config{}, nil
		}
		log.Warn("no usable network config yet; retrying", "from", where, "error", err, "retry_in", d)
		if retry.Sleep(ctx, d) != nil {
			return lease.Config{}, nil
		}
		d = min(2*d, 10*time.Second)
	}
}

// cleanup removes what this node set up: backend state, rules, and the
// blackhole routes and lease of the subnet named by the subnet file (this
// process did not acquire it).
func cleanup(ctx context.Context, c Config, store flannel.LeaseStore, h *netlink.Handle, iface flannel.ExternalInterface, agent *flannel.Agent, log *slog.Logger) error {
	var errs []error
	if c.SubnetFile != "" {
		env, err := flannel.ReadSubnetEnv(c.SubnetFile)
		switch {
		case errors.Is(err, fs.ErrNotExist):
			log.Info("no subnet file; no lease to release", "path", c.SubnetFile)
		case err != nil:
			errs = append(errs, err)
		default:
			l := env.Lease()
			if err := delBlackholes(h, l); err != nil {
				errs = append(errs, err)
			}
			l.Attrs = lease.Attrs{PublicIP: iface.PublicIP, PublicIPv6: iface.PublicIPv6}
			if !l.Attrs.PublicIP.IsValid() {
				l.Attrs.PublicIP = iface.IP
			}
			if !l.Attrs.PublicIPv6.IsValid() {
				l.Attrs.PublicIPv6 = iface.IPv6
			}
			if !env.Subnet.IsValid() {
				l.Attrs.PublicIP = netip.Addr{}
			}
			if !env.IPv6Subnet.IsValid() {
				l.Attrs.PublicIPv6 = netip.Addr{}
			}
			if rel, ok := store.(flannel.LeaseReleaser); ok {
				if err := rel.Release(ctx, l); err != nil {
					errs = append(errs, err)
				} else {
					log.Info("lease released", "lease", l)
				}
			}
		}
	}
	if err := agent.Cleanup(ctx); err != nil {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("cleanup: %w", err)
	}
	log.Info("cleanup done")
	return nil
}

// leaseExpiry returns a function reporting when this node's etcd lease
// expires (zero when unknown or a reservation), for the metrics.
func leaseExpiry(client *clientv3.Client, store *etcdstore.Store) func(ctx context.Context, own lease.Lease) (time.Time, error) {
	return func(ctx context.Context, own lease.Lease) (time.Time, error) {
		resp, err := client.Get(ctx, store.LeaseKey(own))
		if err != nil || len(resp.Kvs) == 0 || resp.Kvs[0].Lease == 0 {
			return time.Time{}, err
		}
		ttl, err := client.TimeToLive(ctx, clientv3.LeaseID(resp.Kvs[0].Lease))
		if err != nil || ttl.TTL <= 0 {
			return time.Time{}, err
		}
		return time.Now().Add(time.Duration(ttl.TTL) * time.Second), nil
	}
}
