package flannel

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"

	"github.com/flannelkit/flannel/internal/retry"
	"github.com/flannelkit/flannel/lease"
)

// Agent composes a LeaseStore and a Backend into a running node: it takes
// a lease, binds the backend to it and keeps the kernel matching the other
// nodes' leases. Create it with NewAgent.
type Agent struct {
	opts AgentOptions
	log  *slog.Logger

	running atomic.Bool

	mu sync.Mutex // guards m; only update and read take it
	m  mutable
}

// NewAgent checks opts and returns an Agent. The error names the missing or
// invalid field.
func NewAgent(opts AgentOptions) (*Agent, error) {
	switch {
	case opts.Store == nil:
		return nil, errors.New("agent options: Store is required")
	case opts.Backend == nil:
		return nil, errors.New("agent options: Backend is required")
	case opts.Handle == nil:
		return nil, errors.New("agent options: Handle is required")
	case opts.Iface.Name == "":
		return nil, errors.New("agent options: Iface.Name is required")
	case opts.RetryMin < 0:
		return nil, fmt.Errorf("agent options: RetryMin %s is negative", opts.RetryMin)
	case opts.RetryMax < 0:
		return nil, fmt.Errorf("agent options: RetryMax %s is negative", opts.RetryMax)
	}
	if opts.RetryMin == 0 {
		opts.RetryMin = min(DefaultRetryMin, max(opts.RetryMax, time.Millisecond))
	}
	if opts.RetryMax == 0 {
		opts.RetryMax = max(DefaultRetryMax, opts.RetryMin)
	}
	if opts.RetryMin > opts.RetryMax {
		return nil, fmt.Errorf("agent options: RetryMin %s exceeds RetryMax %s", opts.RetryMin, opts.RetryMax)
	}
	log := opts.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Agent{opts: opts, log: log, m: mutable{ready: make(chan struct{})}}, nil
}

// Ready returns a channel closed when the current (or, between Runs, the
// next) Run is ready: the lease is held, subnet.env is written (when asked)
// and the peers seen first have been applied (even if some of them failed
// and are being retried). A channel is closed at most once; when a Run that
// became ready returns, Ready returns a new, open channel.
func (a *Agent) Ready() <-chan struct{} { return a.read().ready }

// State returns the agent's current state.
func (a *Agent) State() State { return a.read().state }

// Run brings the node up and keeps it matching its peers until ctx ends,
// then returns nil after joining every goroutine it started, leaving the
// datapath in place so a restart drops no packet. It returns an error when
// the node cannot be brought up (config, backend, lease), when the
// network's Run fails, or a *SubnetChangedError when the lease was lost
// and only different subnets could be re-acquired. Run may be called again
// after it returned (it then reclaims the same lease); calling it while it
// runs returns ErrAgentRunning.
//
// Its body is the data walk, in order: config, prepare, acquire, start,
// subnet.env, rules; then watch, keep and apply run together, and the node
// becomes ready once the first peers seen are applied.
func (a *Agent) Run(ctx context.Context) (err error) {
	if !a.running.CompareAndSwap(false, true) {
		return ErrAgentRunning
	}
	defer a.running.Store(false)
	a.beginRun()
	defer a.endRun()
	defer func() { err = unlessDone(ctx, err) }()

	r := &run{publish: newLatest[lease.Attrs]()}
	if r.cfg, err = a.config(ctx); err != nil {
		return err
	}
	if r.attrs, err = a.prepare(ctx, r.cfg, r.publish); err != nil {
		return err
	}
	if r.own, err = a.acquireOwn(ctx, r.attrs); err != nil {
		return err
	}
	if r.network, err = a.startBackend(ctx, r.own); err != nil {
		return err
	}
	mtu := r.network.MTU()
	if err = a.writeSubnetEnv(r.cfg, r.own, mtu); err != nil {
		return err
	}
	if err = a.ensureRules(ctx, r.cfg, r.own); err != nil {
		return err
	}
	a.update(func(m *mutable) { m.state.MTU = mtu })

	g, gctx := errgroup.WithContext(ctx)
	a.goRunners(gctx, g, r.network)
	snaps := newLatest[lease.Snapshot]()
	g.Go(func() error { return a.watchLoop(gctx, snaps) })
	g.Go(func() error { return a.keepLoop(gctx, r) })
	g.Go(func() error {
		ap := a.newApplier(r, snaps)
		defer ap.stop()
		if ap.untilApplied(gctx) {
			a.becomeReady()
			ap.loop(gctx)
		}
		return nil
	})
	return g.Wait()
}

// unlessDone returns err, or nil once ctx has ended: what cancellation
// interrupts is no failure of Run.
func unlessDone(ctx context.Context, err error) error {
	if ctx.Err() != nil {
		return nil
	}
	return err
}

// run is what one Run holds once the node is up.
type run struct {
	cfg     lease.Config
	attrs   lease.Attrs
	own     lease.Lease // the subnets are fixed for the whole Run
	network Network
	publish *latest[lease.Attrs] // attributes the backend publishes while running
}

// config reads and checks the network config, and records it for Cleanup.
func (a *Agent) config(ctx context.Context) (lease.Config, error) {
	typ := a.opts.Backend.Type()
	cfg, err := a.opts.Store.Config(ctx)
	if err != nil {
		return lease.Config{}, fmt.Errorf("get network config: %w", err)
	}
	if err := cfg.Validate(); err != nil {
		return lease.Config{}, fmt.Errorf("network config: %w", err)
	}
	if cfg.BackendType != "" && cfg.BackendType != typ {
		return lease.Config{}, fmt.Errorf("network config: backend type %q but the agent runs %q: %w", cfg.BackendType, typ, lease.ErrInvalidConfig)
	}
	a.update(func(m *mutable) { m.cfg, m.haveCfg = cfg, true })
	return cfg, nil
}

// prepare lets the backend set up what does not depend on the lease, and
// returns the attributes to publish, completed by fillAttrs. What the
// backend publishes later arrives in pub.
func (a *Agent) prepare(ctx context.Context, cfg lease.Config, pub *latest[lease.Attrs]) (lease.Attrs, error) {
	env := a.env(cfg)
	env.Previous = a.findOwn(ctx)
	env.Publish = pub.put
	attrs, err := a.opts.Backend.Prepare(ctx, env)
	if err != nil {
		return lease.Attrs{}, fmt.Errorf("prepare %s backend: %w", a.opts.Backend.Type(), err)
	}
	return a.fillAttrs(cfg, attrs), nil
}

// acquireOwn takes the node's lease with attrs, asking for the subnets
// recorded in SubnetFile, and records it in the state.
func (a *Agent) acquireOwn(ctx context.Context, attrs lease.Attrs) (lease.Lease, error) {
	own, err := a.acquire(ctx, lease.Request{Attrs: attrs, Previous: a.previous()})
	if err != nil {
		return lease.Lease{}, err
	}
	a.log.Info("lease acquired", "lease", own, "public_ip", attrs.PublicIP, "public_ipv6", attrs.PublicIPv6)
	a.update(func(m *mutable) { m.state.Lease = own })
	return own, nil
}

// startBackend binds the backend to own.
func (a *Agent) startBackend(ctx context.Context, own lease.Lease) (Network, error) {
	network, err := a.opts.Backend.Start(ctx, own)
	if err != nil {
		return nil, fmt.Errorf("start %s backend with lease %s: %w", a.opts.Backend.Type(), own, err)
	}
	return network, nil
}

// writeSubnetEnv writes SubnetFile for the CNI plugin, when asked.
func (a *Agent) writeSubnetEnv(cfg lease.Config, own lease.Lease, mtu int) error {
	if a.opts.SubnetFile == "" {
		return nil
	}
	return WriteSubnetEnv(a.opts.SubnetFile, SubnetEnvFor(cfg, own, mtu, a.opts.IPMasq))
}

// ensureRules ensures the traffic rules for own, when the caller gave any.
func (a *Agent) ensureRules(ctx context.Context, cfg lease.Config, own lease.Lease) error {
	if a.opts.Rules == nil {
		return nil
	}
	if err := a.opts.Rules.Ensure(ctx, cfg, own); err != nil {
		return fmt.Errorf("ensure traffic rules for lease %s: %w", own, err)
	}
	return nil
}

// goRunners runs the network's Run and, when given, the traffic rules' Run
// in g. Their errors end the Run; cancellation is none.
func (a *Agent) goRunners(ctx context.Context, g *errgroup.Group, network Network) {
	g.Go(func() error {
		if err := network.Run(ctx); err != nil && ctx.Err() == nil {
			return fmt.Errorf("%s network: %w", a.opts.Backend.Type(), err)
		}
		return nil
	})
	if a.opts.Rules != nil {
		g.Go(func() error {
			if err := a.opts.Rules.Run(ctx); err != nil && ctx.Err() == nil {
				return fmt.Errorf("traffic rules: %w", err)
			}
			return nil
		})
	}
}

func (a *Agent) env(cfg lease.Config) Env {
	return Env{Config: cfg, Iface: a.opts.Iface, Handle: a.opts.Handle, NS: a.opts.NS, Logger: a.log}
}

// findOwn returns the node's lease from a previous run when the store is a
// LeaseFinder, looked up by the interface's public addresses; zero when
// none, or when the lookup fails (logged: it only helps the backend keep
// its state).
func (a *Agent) findOwn(ctx context.Context) lease.Lease {
	f, ok := a.opts.Store.(LeaseFinder)
	if !ok {
		return lease.Lease{}
	}
	ifc := a.opts.Iface
	attrs := lease.Attrs{BackendType: a.opts.Backend.Type(), PublicIP: ifc.PublicIP, PublicIPv6: ifc.PublicIPv6}
	if !attrs.PublicIP.IsValid() {
		attrs.PublicIP = ifc.IP
	}
	if !attrs.PublicIPv6.IsValid() {
		attrs.PublicIPv6 = ifc.IPv6
	}
	l, found, err := f.FindOwn(ctx, attrs)
	switch {
	case err != nil:
		a.log.Warn("cannot look up the previous lease; continuing without it", "public_ip", attrs.PublicIP, "public_ipv6", attrs.PublicIPv6, "error", err)
		return lease.Lease{}
	case !found:
		return lease.Lease{}
	}
	a.log.Debug("previous lease found", "lease", l)
	return l
}

// fillAttrs completes what the backend returned: the backend type and the
// public addresses of the enabled families.
func (a *Agent) fillAttrs(cfg lease.Config, attrs lease.Attrs) lease.Attrs {
	if attrs.BackendType == "" {
		attrs.BackendType = a.opts.Backend.Type()
	}
	ifc := a.opts.Iface
	if cfg.EnableIPv4 && !attrs.PublicIP.IsValid() {
		attrs.PublicIP = ifc.PublicIP
		if !attrs.PublicIP.IsValid() {
			attrs.PublicIP = ifc.IP
		}
		if !attrs.PublicIP.IsValid() {
			a.log.Warn("no public IPv4 address to publish", "iface", ifc.Name)
		}
	}
	if cfg.EnableIPv6 && !attrs.PublicIPv6.IsValid() {
		attrs.PublicIPv6 = ifc.PublicIPv6
		if !attrs.PublicIPv6.IsValid() {
			attrs.PublicIPv6 = ifc.IPv6
		}
		if !attrs.PublicIPv6.IsValid() {
			a.log.Warn("no public IPv6 address to publish", "iface", ifc.Name)
		}
	}
	return attrs
}

// previous returns the subnets recorded in SubnetFile, if any.
func (a *Agent) previous() lease.Lease {
	if a.opts.SubnetFile == "" {
		return lease.Lease{}
	}
	e, err := ReadSubnetEnv(a.opts.SubnetFile)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return lease.Lease{}
	case err != nil:
		a.log.Warn("ignoring unreadable subnet file", "path", a.opts.SubnetFile, "error", err)
		return lease.Lease{}
	}
	return e.Lease()
}

// acquire calls Store.Acquire, waiting (with backoff) while the store has
// not assigned a subnet yet.
func (a *Agent) acquire(ctx context.Context, req lease.Request) (lease.Lease, error) {
	bo := a.newBackoff()
	for {
		l, err := a.opts.Store.Acquire(ctx, req)
		if err == nil {
			return l, nil
		}
		if !errors.Is(err, lease.ErrNotAssigned) || ctx.Err() != nil {
			return lease.Lease{}, fmt.Errorf("acquire lease: %w", err)
		}
		d := bo.Next()
		a.log.Info("waiting for the store to assign a subnet", "error", err, "retry_in", d)
		if retry.Sleep(ctx, d) != nil {
			return lease.Lease{}, fmt.Errorf("acquire lease: %w", ctx.Err())
		}
	}
}

// Cleanup removes what the node set up: the backend's kernel state, the
// traffic rules (when Rules is set), its lease (when the store can release leases and the agent knows it, i.e.
// after a Run) and SubnetFile. It attempts every step and returns their
// errors joined. It must not be called while Run runs (ErrAgentRunning);
// it is safe to call again.
func (a *Agent) Cleanup(ctx context.Context) error {
	if !a.running.CompareAndSwap(false, true) {
		return ErrAgentRunning
	}
	defer a.running.Store(false)

	var errs []error
	m := a.read()
	cfg, haveCfg, own := m.cfg, m.haveCfg, m.state.Lease
	if !haveCfg {
		c, err := a.opts.Store.Config(ctx)
		if err != nil {
			errs = append(errs, fmt.Errorf("get network config: %w", err))
		} else {
			cfg = c
		}
	}
	if err := a.opts.Backend.Cleanup(ctx, a.env(cfg)); err != nil {
		errs = append(errs, fmt.Errorf("clean up %s backend: %w", a.opts.Backend.Type(), err))
	}
	if a.opts.Rules != nil {
		if err := a.opts.Rules.Cleanup(ctx); err != nil {
			errs = append(errs, fmt.Errorf("clean up traffic rules: %w", err))
		}
	}
	if rel, ok := a.opts.Store.(LeaseReleaser); ok && (own.Subnet.IsValid() || own.IPv6Subnet.IsValid()) {
		if err := rel.Release(ctx, own); err != nil {
			errs = append(errs, fmt.Errorf("release lease %s: %w", own, err))
		} else {
			a.log.Info("lease released", "lease", own)
			a.update(func(m *mutable) { m.state.Lease = lease.Lease{} })
		}
	}
	if a.opts.SubnetFile != "" {
		if err := os.Remove(a.opts.SubnetFile); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove subnet file: %w", err))
		}
	}
	return errors.Join(errs...)
}
