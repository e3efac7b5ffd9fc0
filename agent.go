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

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sync/errgroup"

	"github.com/flannelkit/flannel/internal/retry"
	"github.com/flannelkit/flannel/lease"
)

// Default retry bounds for AgentOptions.RetryMin and RetryMax.
const (
	DefaultRetryMin = 500 * time.Millisecond
	DefaultRetryMax = 30 * time.Second
)

// ErrAgentRunning is returned by Run and Cleanup while Run is executing.
var ErrAgentRunning = errors.New("agent is already running")

// ErrSubnetChanged is matched (errors.Is) by a *SubnetChangedError.
var ErrSubnetChanged = errors.New("node subnet changed")

// SubnetChangedError is returned by Agent.Run when the node lost its lease
// and the store could only give it different subnets. The agent does not
// reprogram the node by itself: pods hold addresses of the Old subnets, so
// the embedder must move them (typically: drain and restart the node agent,
// whose next Run reclaims New). It matches ErrSubnetChanged and
// lease.ErrLeaseLost with errors.Is.
type SubnetChangedError struct {
	Old, New lease.Lease
}

func (e *SubnetChangedError) Error() string {
	return fmt.Sprintf("lease %s lost and re-acquired as %s: pods on this node must move", e.Old, e.New)
}

// Is reports whether target is ErrSubnetChanged.
func (e *SubnetChangedError) Is(target error) bool { return target == ErrSubnetChanged }

// Unwrap returns lease.ErrLeaseLost: the change follows a lost lease.
func (e *SubnetChangedError) Unwrap() error { return lease.ErrLeaseLost }

// AgentOptions configure an Agent.
type AgentOptions struct {
	// Store is where the node's lease is published and peers are found.
	// Required.
	Store LeaseStore
	// Backend programs the node's kernel. Required.
	Backend Backend
	// Iface is the node's external interface (backend.FindInterface).
	// Required: Name must be set. Its PublicIP/PublicIPv6 are published
	// when the backend does not set them.
	Iface ExternalInterface
	// Handle is a netlink handle bound to the node's network namespace,
	// passed to the backend. Required.
	Handle *netlink.Handle
	// NS is the node's network namespace, for sysctls. Optional.
	NS netns.NsHandle
	// Logger receives the agent's and the backend's logs. Optional: nil
	// discards.
	Logger *slog.Logger
	// SubnetFile is where subnet.env is written for the CNI plugin (e.g.
	// /run/flannel/subnet.env), and where the previous subnet is read from
	// on start. Optional: empty means no file.
	SubnetFile string
	// IPMasq is written to subnet.env as FLANNEL_IPMASQ. Optional.
	IPMasq bool
	// OnReady is called once per Run, after Ready's channel is closed, with
	// the state at that moment. It must not block for long. Optional.
	OnReady func(State)
	// RetryMin and RetryMax bound the capped, jittered exponential backoff
	// used to retry failed Apply, Watch and Keep calls. Optional: defaults
	// DefaultRetryMin and DefaultRetryMax.
	RetryMin, RetryMax time.Duration
	// Rules keeps the node's masquerade and forward rules: ensured after
	// subnet.env is written and before the agent is ready (a failure ends
	// Run), run alongside the network, removed by Cleanup. Optional: nil
	// means the agent touches no netfilter rule.
	Rules TrafficRules
	// OnApply is called after every Apply of the peers with the number of
	// peers, how long Apply took and its error, e.g. for metrics. It must
	// not block. Optional.
	OnApply func(peers int, took time.Duration, err error)
	// OnWatchRestart is called when the store's Watch returned an error
	// and is about to be restarted. It must not block. Optional.
	OnWatchRestart func(err error)
	// OnKeepError is called when keeping the lease failed; err wraps
	// lease.ErrLeaseLost when the lease was lost. It must not block.
	// Optional.
	OnKeepError func(err error)
}

// State is a point-in-time view of an Agent.
type State struct {
	// Lease is the node's current lease; zero before the first one.
	Lease lease.Lease
	// MTU is the MTU pods on this node should use; 0 before Start.
	MTU int
	// Peers is the number of peers in the last set applied to the kernel.
	Peers int
	// Ready is true while Run is running and has become ready.
	Ready bool
	// ApplyingSince is when the Apply now running began; zero when none
	// runs. An Apply that has run for long (minutes) is wedged: a health
	// check can report it (examples/flanneld's /healthz does).
	ApplyingSince time.Time
}

// Agent composes a LeaseStore and a Backend into a running node: it takes
// a lease, binds the backend to it and keeps the kernel matching the other
// nodes' leases. Create it with NewAgent.
type Agent struct {
	opts AgentOptions
	log  *slog.Logger

	running atomic.Bool

	mu          sync.Mutex
	ready       chan struct{}
	readyClosed bool
	state       State
	cfg         lease.Config
	haveCfg     bool
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
	return &Agent{opts: opts, log: log, ready: make(chan struct{})}, nil
}

// Ready returns a channel closed when the current (or, between Runs, the
// next) Run is ready: the lease is held, subnet.env is written (when asked)
// and the peers seen first have been applied (even if some of them failed
// and are being retried). A channel is closed at most once; when a Run that
// became ready returns, Ready returns a new, open channel.
func (a *Agent) Ready() <-chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.ready
}

// State returns the agent's current state.
func (a *Agent) State() State {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.state
}

// Run brings the node up and keeps it matching its peers until ctx ends,
// then returns nil after joining every goroutine it started, leaving the
// datapath in place so a restart drops no packet. It returns an error when
// the node cannot be brought up (config, backend, lease), when the
// network's Run fails, or a *SubnetChangedError when the lease was lost
// and only different subnets could be re-acquired. Run may be called again
// after it returned (it then reclaims the same lease); calling it while it
// runs returns ErrAgentRunning.
func (a *Agent) Run(ctx context.Context) error {
	if !a.running.CompareAndSwap(false, true) {
		return ErrAgentRunning
	}
	defer a.running.Store(false)
	a.beginRun()
	defer a.endRun()

	r, err := a.start(ctx)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}

	g, gctx := errgroup.WithContext(ctx)
	snaps := newLatest[lease.Snapshot]()
	g.Go(func() error {
		if err := r.network.Run(gctx); err != nil && gctx.Err() == nil {
			return fmt.Errorf("%s network: %w", a.opts.Backend.Type(), err)
		}
		return nil
	})
	if a.opts.Rules != nil {
		g.Go(func() error {
			if err := a.opts.Rules.Run(gctx); err != nil && gctx.Err() == nil {
				return fmt.Errorf("traffic rules: %w", err)
			}
			return nil
		})
	}
	g.Go(func() error { return a.watchLoop(gctx, snaps) })
	g.Go(func() error { return a.applyLoop(gctx, r, snaps) })
	g.Go(func() error { return a.keepLoop(gctx, r) })
	err = g.Wait()
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

// start does the sequential part of Run: config, prepare, lease, start,
// subnet.env.
func (a *Agent) start(ctx context.Context) (*run, error) {
	typ := a.opts.Backend.Type()
	cfg, err := a.opts.Store.Config(ctx)
	if err != nil {
		return nil, fmt.Errorf("get network config: %w", err)
	}
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("network config: %w", err)
	}
	if cfg.BackendType != "" && cfg.BackendType != typ {
		return nil, fmt.Errorf("network config: backend type %q but the agent runs %q: %w", cfg.BackendType, typ, lease.ErrInvalidConfig)
	}
	a.mu.Lock()
	a.cfg, a.haveCfg = cfg, true
	a.mu.Unlock()

	env := a.env(cfg)
	env.Previous = a.findOwn(ctx)
	pub := newLatest[lease.Attrs]()
	env.Publish = pub.put
	attrs, err := a.opts.Backend.Prepare(ctx, env)
	if err != nil {
		return nil, fmt.Errorf("prepare %s backend: %w", typ, err)
	}
	attrs = a.fillAttrs(cfg, attrs)

	req := lease.Request{Attrs: attrs, Previous: a.previous()}
	own, err := a.acquire(ctx, req)
	if err != nil {
		return nil, err
	}
	a.log.Info("lease acquired", "lease", own, "public_ip", attrs.PublicIP, "public_ipv6", attrs.PublicIPv6)
	a.mu.Lock()
	a.state.Lease = own
	a.mu.Unlock()

	network, err := a.opts.Backend.Start(ctx, own)
	if err != nil {
		return nil, fmt.Errorf("start %s backend with lease %s: %w", typ, own, err)
	}
	mtu := network.MTU()
	if a.opts.SubnetFile != "" {
		if err := WriteSubnetEnv(a.opts.SubnetFile, SubnetEnvFor(cfg, own, mtu, a.opts.IPMasq)); err != nil {
			return nil, err
		}
	}
	if a.opts.Rules != nil {
		if err := a.opts.Rules.Ensure(ctx, cfg, own); err != nil {
			return nil, fmt.Errorf("ensure traffic rules for lease %s: %w", own, err)
		}
	}
	a.mu.Lock()
	a.state.MTU = mtu
	a.mu.Unlock()
	return &run{cfg: cfg, attrs: attrs, own: own, network: network, publish: pub}, nil
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
	a.mu.Lock()
	cfg, haveCfg, own := a.cfg, a.haveCfg, a.state.Lease
	a.mu.Unlock()
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
			a.mu.Lock()
			a.state.Lease = lease.Lease{}
			a.mu.Unlock()
		}
	}
	if a.opts.SubnetFile != "" {
		if err := os.Remove(a.opts.SubnetFile); err != nil && !errors.Is(err, fs.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove subnet file: %w", err))
		}
	}
	return errors.Join(errs...)
}
