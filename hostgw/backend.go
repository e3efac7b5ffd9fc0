package hostgw

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/lease"
)

// Type is the backend's name in net-conf.json.
const Type = "host-gw"

// DefaultRepairInterval is how often a running Network re-applies the last
// peer set when Options.RepairInterval is zero.
const DefaultRepairInterval = 10 * time.Second

// Options configure a Backend.
type Options struct {
	// RepairInterval is how often Network.Run re-applies the last peer set
	// to repair drift that no kernel event announced. Optional: 10s.
	RepairInterval time.Duration
	// Ignored are the net-conf.json keys FromConfig accepted without
	// effect (upstream's Windows-only Name and DNSServerList); Prepare
	// warns about each.
	Ignored []string
}

// Backend is the host-gw flannel.Backend. Prepare must be called before
// Start; a Backend may be prepared and started again (e.g. by a restarted
// Agent). It is safe for concurrent use.
type Backend struct {
	opts Options

	mu       sync.Mutex
	env      flannel.Env
	prepared bool
}

var _ flannel.Backend = (*Backend)(nil)

// New returns a host-gw backend. A zero RepairInterval (or a negative one)
// means DefaultRepairInterval. host-gw has no option that can be out of
// range, so the error is nil; it is there so that every backend
// constructor (vxlan.New, ipsec.New) has the same shape.
func New(opts Options) (*Backend, error) {
	if opts.RepairInterval <= 0 {
		opts.RepairInterval = DefaultRepairInterval
	}
	return &Backend{opts: opts}, nil
}

// FromConfig builds a host-gw backend from the network configuration, for a
// backend.Registry. host-gw has no settings on Linux: upstream's
// Windows-only Name and DNSServerList are accepted and ignored (with a
// warning at Prepare), and any other key of the "Backend" object than
// "Type" is an error wrapping lease.ErrInvalidConfig that names the key.
func FromConfig(cfg lease.Config) (flannel.Backend, error) {
	if cfg.BackendType != "" && cfg.BackendType != Type {
		return nil, fmt.Errorf("%w: Backend.Type %q is not %q", lease.ErrInvalidConfig, cfg.BackendType, Type)
	}
	if raw := bytes.TrimSpace(cfg.Backend); len(raw) > 0 && !bytes.Equal(raw, []byte("null")) {
		var keys map[string]json.RawMessage
		if err := json.Unmarshal(raw, &keys); err != nil {
			return nil, fmt.Errorf("%w: Backend: %v", lease.ErrInvalidConfig, err)
		}
		var o Options
		for k := range keys {
			switch {
			case strings.EqualFold(k, "Type"):
			case strings.EqualFold(k, "Name"):
				o.Ignored = append(o.Ignored, "Name")
			case strings.EqualFold(k, "DNSServerList"):
				o.Ignored = append(o.Ignored, "DNSServerList")
			default:
				return nil, fmt.Errorf("%w: Backend.%s: unknown key for the %s backend (it has no settings; known: Type, and Windows' Name, DNSServerList)", lease.ErrInvalidConfig, k, Type)
			}
		}
		slices.Sort(o.Ignored)
		return New(o)
	}
	return New(Options{})
}

// Type returns "host-gw".
func (b *Backend) Type() string { return Type }

// Prepare checks the environment (a handle, an existing external interface
// with the public address of every enabled family), enables IP forwarding
// in env.NS when it is open (host-gw routes pod traffic through the node),
// and returns the attributes to publish: BackendType "host-gw" and the
// interface's public addresses. It may be called again.
func (b *Backend) Prepare(ctx context.Context, env flannel.Env) (lease.Attrs, error) {
	if env.Handle == nil {
		return lease.Attrs{}, errors.New("host-gw: prepare: no netlink handle")
	}
	backend.WarnIgnoredKeys(backend.Logger(env.Logger).With("backend", Type), Type, b.opts.Ignored)
	iface, err := backend.BindInterface(env.Handle, env.Iface, env.Config)
	if err != nil {
		return lease.Attrs{}, fmt.Errorf("host-gw: prepare: %w", err)
	}
	env.Iface = iface
	if env.NS.IsOpen() {
		v4, v6 := env.Config.EnableIPv4, env.Config.EnableIPv6
		if !v4 && !v6 { // a hand-built Config: go by the addresses
			v4, v6 = env.Iface.PublicIP.IsValid(), env.Iface.PublicIPv6.IsValid()
		}
		if v4 {
			if err := nlsafe.SetSysctl(env.NS, "net/ipv4/ip_forward", "1"); err != nil {
				return lease.Attrs{}, fmt.Errorf("host-gw: prepare: %w", err)
			}
		}
		if v6 {
			if err := nlsafe.SetSysctl(env.NS, "net/ipv6/conf/all/forwarding", "1"); err != nil {
				return lease.Attrs{}, fmt.Errorf("host-gw: prepare: %w", err)
			}
		}
	}
	b.mu.Lock()
	b.env, b.prepared = env, true
	b.mu.Unlock()
	return lease.Attrs{
		BackendType: Type,
		PublicIP:    env.Iface.PublicIP,
		PublicIPv6:  env.Iface.PublicIPv6,
	}, nil
}

// Start returns the Network for own. It programs nothing until the first
// Apply. It fails when Prepare was not called or own has no subnet.
func (b *Backend) Start(ctx context.Context, own lease.Lease) (flannel.Network, error) {
	b.mu.Lock()
	env, ok := b.env, b.prepared
	b.mu.Unlock()
	if !ok {
		return nil, errors.New("host-gw: start: Prepare was not called")
	}
	if !own.Subnet.IsValid() && !own.IPv6Subnet.IsValid() {
		return nil, errors.New("host-gw: start: lease has no subnet")
	}
	return newNetwork(env, own, b.opts.RepairInterval), nil
}

// Cleanup removes every route with backend.RouteProtocol on env's external
// interface. A missing interface means there is nothing to remove. It is
// safe to call again.
func (b *Backend) Cleanup(ctx context.Context, env flannel.Env) error {
	if env.Handle == nil {
		return errors.New("host-gw: cleanup: no netlink handle")
	}
	link, err := backend.ResolveLink(env.Handle, env.Iface)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return fmt.Errorf("host-gw: cleanup: %w", err)
	}
	rec := backend.RouteReconciler{Logger: backend.Logger(env.Logger)}
	if err := rec.Reconcile(ctx, env.Handle, link.Attrs().Index, nil); err != nil {
		return fmt.Errorf("host-gw: cleanup routes on %s: %w", link.Attrs().Name, err)
	}
	return nil
}
