package ipip

import (
	"context"
	"errors"
	"fmt"
	"sync"

	"github.com/vishvananda/netlink"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/lease"
)

// Backend is the ipip flannel.Backend. Prepare must be called before Start;
// a Backend may be prepared and started again. It is safe for concurrent
// use.
type Backend struct {
	opts Options

	mu       sync.Mutex
	env      flannel.Env
	mtu      int
	prepared bool
}

var _ flannel.Backend = (*Backend)(nil)

// New returns an ipip backend.
func New(opts Options) *Backend { return &Backend{opts: opts.withDefaults()} }

// Type returns "ipip".
func (b *Backend) Type() string { return Type }

// Prepare checks the environment (a handle, IPv4 only, an external
// interface with an IPv4 address and an MTU leaving room for the outer
// header), enables IPv4 forwarding in env.NS when it is open, creates (or
// keeps) flannel.ipip and returns the attributes to publish: BackendType
// "ipip" and the public IPv4 address. Without the ipip module the error
// wraps ErrNoKernelSupport. It may be called again.
func (b *Backend) Prepare(ctx context.Context, env flannel.Env) (lease.Attrs, error) {
	if env.Handle == nil {
		return lease.Attrs{}, errors.New("ipip: prepare: no netlink handle")
	}
	if err := CheckConfig(env.Config); err != nil {
		return lease.Attrs{}, fmt.Errorf("ipip: prepare: %w", err)
	}
	iface, err := backend.BindInterface(env.Handle, env.Iface, env.Config)
	if err != nil {
		return lease.Attrs{}, fmt.Errorf("ipip: prepare: %w", err)
	}
	if !iface.IP.IsValid() || !iface.IP.Is4() {
		return lease.Attrs{}, fmt.Errorf("ipip: prepare: interface %s has no IPv4 address", iface.Name)
	}
	if !iface.PublicIP.IsValid() {
		iface.PublicIP = iface.IP
	}
	env.Iface = iface
	mtu := iface.MTU - Overhead
	if mtu < minMTU {
		return lease.Attrs{}, fmt.Errorf("ipip: prepare: MTU %d of %s is too small for ipip", iface.MTU, iface.Name)
	}
	if env.NS.IsOpen() && env.NS != 0 { // a zero Env.NS is no namespace
		if err := nlsafe.SetSysctl(env.NS, "net/ipv4/ip_forward", "1"); err != nil {
			return lease.Attrs{}, fmt.Errorf("ipip: prepare: %w", err)
		}
	}
	if _, err := ensureDevice(env.Handle, iface.IP, mtu, backend.Logger(env.Logger).With("backend", Type)); err != nil {
		return lease.Attrs{}, fmt.Errorf("ipip: prepare: %w", err)
	}
	b.mu.Lock()
	b.env, b.mtu, b.prepared = env, mtu, true
	b.mu.Unlock()
	return lease.Attrs{BackendType: Type, PublicIP: iface.PublicIP}, nil
}

// Start puts the lease's network address on flannel.ipip (as /32, other
// IPv4 addresses removed) and returns the Network. It programs no peer
// route before the first Apply. It fails when Prepare was not called or
// own has no IPv4 subnet.
func (b *Backend) Start(ctx context.Context, own lease.Lease) (flannel.Network, error) {
	b.mu.Lock()
	env, mtu, ok := b.env, b.mtu, b.prepared
	b.mu.Unlock()
	if !ok {
		return nil, errors.New("ipip: start: Prepare was not called")
	}
	if !own.Subnet.IsValid() {
		return nil, errors.New("ipip: start: lease has no IPv4 subnet")
	}
	n := newNetwork(env, own, mtu, b.opts)
	if _, err := n.ensure(); err != nil {
		return nil, fmt.Errorf("ipip: start: %w", err)
	}
	return n, nil
}

// Cleanup deletes flannel.ipip (its routes go with it) and the direct
// routes of ours on env's external interface. What is missing counts as
// removed; it is safe to call again.
func (b *Backend) Cleanup(ctx context.Context, env flannel.Env) error {
	if env.Handle == nil {
		return errors.New("ipip: cleanup: no netlink handle")
	}
	l, err := env.Handle.LinkByName(DeviceName)
	var nf netlink.LinkNotFoundError
	switch {
	case errors.As(err, &nf):
	case err != nil:
		return fmt.Errorf("ipip: cleanup: %w", err)
	case l.Type() != "ipip":
		return fmt.Errorf("ipip: cleanup: device %s is not an ipip device (type %s): left alone", DeviceName, l.Type())
	default:
		if err := env.Handle.LinkDel(l); err != nil && !errors.As(err, &nf) {
			return fmt.Errorf("ipip: cleanup: delete %s: %w", DeviceName, err)
		}
	}
	link, err := backend.ResolveLink(env.Handle, env.Iface)
	if errors.As(err, &nf) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("ipip: cleanup: %w", err)
	}
	rec := backend.RouteReconciler{Logger: backend.Logger(env.Logger)}
	if err := rec.Reconcile(ctx, env.Handle, link.Attrs().Index, nil); err != nil {
		return fmt.Errorf("ipip: cleanup routes on %s: %w", link.Attrs().Name, err)
	}
	return nil
}
