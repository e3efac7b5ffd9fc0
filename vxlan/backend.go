package vxlan

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"slices"
	"sync"

	"github.com/vishvananda/netlink"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/lease"
)

// Backend is the vxlan flannel.Backend. Prepare must be called before
// Start; a Backend may be prepared and started again (e.g. by a restarted
// Agent), and then keeps the VTEP MACs it used. It is safe for concurrent
// use.
type Backend struct {
	opts Options

	mu       sync.Mutex
	env      flannel.Env
	prepared bool
	devs     []*device // IPv4 underlay first
	macs     map[string]net.HardwareAddr
}

var _ flannel.Backend = (*Backend)(nil)

// device is a prepared flannel device.
type device struct {
	spec  devSpec
	mac   net.HardwareAddr
	index int
}

// New returns a vxlan backend. It fails when an option is out of range.
func New(opts Options) (*Backend, error) {
	if err := opts.validate(); err != nil {
		return nil, fmt.Errorf("%w: vxlan: %v", lease.ErrInvalidConfig, err)
	}
	return &Backend{opts: opts.withDefaults(), macs: map[string]net.HardwareAddr{}}, nil
}

// Type returns "vxlan".
func (b *Backend) Type() string { return Type }

// families reports which underlay families env asks for: the Config's,
// else (a hand-built Config) the interface's addresses.
func families(env flannel.Env) (v4, v6 bool) {
	v4, v6 = env.Config.EnableIPv4, env.Config.EnableIPv6
	if !v4 && !v6 {
		v4, v6 = env.Iface.PublicIP.IsValid(), env.Iface.PublicIPv6.IsValid()
	}
	return v4, v6
}

// Prepare creates (or reuses, or replaces when its attributes differ) the
// VXLAN device of every enabled family, with local = the interface address
// and dev = the external interface, sets its MTU and brings it up, enables
// forwarding (when env.NS is open) and returns the attributes to publish:
// BackendType "vxlan", the public addresses and the backend data with the
// device MACs. A device it has to create gets the MAC pinned in Options,
// else the one this Backend used before, else the one in env.Previous's
// backend data (vxlan, same VNI), else a random one: peers' FDB entries stay
// valid across restarts. It may be called again; it changes nothing then.
func (b *Backend) Prepare(ctx context.Context, env flannel.Env) (lease.Attrs, error) {
	if env.Handle == nil {
		return lease.Attrs{}, errors.New("vxlan: prepare: no netlink handle")
	}
	log := backend.Logger(env.Logger).With("backend", Type)
	backend.WarnIgnoredKeys(log, Type, b.opts.Ignored)
	link, err := backend.ResolveLink(env.Handle, env.Iface)
	if err != nil {
		return lease.Attrs{}, fmt.Errorf("vxlan: prepare: %w", err)
	}
	env.Iface.Index = link.Attrs().Index
	if env.Iface.Name == "" {
		env.Iface.Name = link.Attrs().Name
	}
	if env.Iface.MTU == 0 {
		env.Iface.MTU = link.Attrs().MTU
	}
	base := b.opts.MTU
	if base == 0 {
		base = env.Iface.MTU
	}
	specs, err := b.specs(env, base)
	if err != nil {
		return lease.Attrs{}, err
	}
	if err := enableForwarding(env); err != nil {
		return lease.Attrs{}, fmt.Errorf("vxlan: prepare: %w", err)
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	attrs := lease.Attrs{BackendType: Type}
	var devs []*device
	for _, s := range specs {
		s.vni, s.port, s.extIndex = b.opts.VNI, b.opts.Port, env.Iface.Index
		s.gbp, s.learning, s.noTXCsum = b.opts.GBP, b.opts.Learning, b.opts.DisableTXChecksum
		if s.mtu < 68 {
			return lease.Attrs{}, fmt.Errorf("vxlan: prepare: device %s: MTU %d too small (underlay MTU %d)", s.name, s.mtu, base)
		}
		mac := b.pinnedMAC(s)
		if mac == nil {
			mac = previousMAC(env.Previous, s, log)
		}
		d := &device{spec: s, mac: mac}
		if err := d.ensure(env, log); err != nil {
			return lease.Attrs{}, fmt.Errorf("vxlan: prepare: %w", err)
		}
		b.macs[s.name] = d.mac
		data, err := json.Marshal(BackendData{VNI: s.vni, VtepMAC: d.mac})
		if err != nil {
			return lease.Attrs{}, fmt.Errorf("vxlan: prepare: %w", err)
		}
		if s.v6 {
			attrs.PublicIPv6, attrs.BackendV6Data = env.Iface.PublicIPv6, data
		} else {
			attrs.PublicIP, attrs.BackendData = env.Iface.PublicIP, data
		}
		devs = append(devs, d)
	}
	b.env, b.prepared, b.devs = env, true, devs
	return attrs, nil
}

// specs returns the devices env's families ask for, on an underlay of MTU
// base. It fails when the interface lacks the address of a family.
func (b *Backend) specs(env flannel.Env, base int) ([]devSpec, error) {
	v4, v6 := families(env)
	var specs []devSpec
	if v4 {
		local := env.Iface.IP
		if !local.IsValid() {
			local = env.Iface.PublicIP
		}
		if !local.IsValid() || !env.Iface.PublicIP.IsValid() {
			return nil, fmt.Errorf("vxlan: prepare: interface %s has no IPv4 address and IPv4 is enabled", env.Iface.Name)
		}
		specs = append(specs, devSpec{name: deviceName(b.opts.VNI, false), local: local, mtu: base - overhead4})
	}
	if v6 {
		local := env.Iface.IPv6
		if !local.IsValid() {
			local = env.Iface.PublicIPv6
		}
		if !local.IsValid() || !env.Iface.PublicIPv6.IsValid() {
			return nil, fmt.Errorf("vxlan: prepare: interface %s has no IPv6 address and IPv6 is enabled", env.Iface.Name)
		}
		specs = append(specs, devSpec{name: deviceName(b.opts.VNI, true), v6: true, local: local, mtu: base - overhead6})
	}
	return specs, nil
}

// enableForwarding turns on forwarding of env's families in env.NS, when
// it is open.
func enableForwarding(env flannel.Env) error {
	if !env.NS.IsOpen() {
		return nil
	}
	v4, v6 := families(env)
	if v4 {
		if err := nlsafe.SetSysctl(env.NS, "net/ipv4/ip_forward", "1"); err != nil {
			return err
		}
	}
	if v6 {
		if err := nlsafe.SetSysctl(env.NS, "net/ipv6/conf/all/forwarding", "1"); err != nil {
			return err
		}
	}
	return nil
}

// pinnedMAC is the MAC a device gets when it has to be created: the one
// pinned in Options, else the one this Backend used before.
func (b *Backend) pinnedMAC(s devSpec) net.HardwareAddr {
	switch {
	case s.v6 && b.opts.VtepMACv6 != nil:
		return slices.Clone(b.opts.VtepMACv6)
	case !s.v6 && b.opts.VtepMAC != nil:
		return slices.Clone(b.opts.VtepMAC)
	}
	return b.macs[s.name]
}

// previousMAC is the MAC the device had in this node's previous lease
// (BackendV6Data for the IPv6 device), when that lease was published by a
// vxlan backend with the same VNI; nil otherwise.
func previousMAC(prev lease.Lease, s devSpec, log *slog.Logger) net.HardwareAddr {
	if prev.Attrs.BackendType != Type {
		return nil
	}
	raw := prev.Attrs.BackendData
	if s.v6 {
		raw = prev.Attrs.BackendV6Data
	}
	if len(raw) == 0 {
		return nil
	}
	d, err := ParseBackendData(raw)
	if err != nil {
		log.Warn("ignoring the previous lease's backend data", "device", s.name, "lease", prev, "error", err)
		return nil
	}
	if d.VNI != s.vni {
		return nil
	}
	return d.VtepMAC
}

// ensure makes the kernel device match d.spec, keeping d.mac, and records
// the device's index and MAC. With DisableTXChecksum it turns TX checksum
// offload off (env.NS must be open for that).
func (d *device) ensure(env flannel.Env, log *slog.Logger) error {
	v, err := ensureDevice(env.Handle, env.NS, d.spec, d.mac, d.index == 0, log)
	if err != nil {
		return err
	}
	d.index, d.mac = v.Attrs().Index, slices.Clone(v.Attrs().HardwareAddr)
	if d.spec.noTXCsum {
		if !env.NS.IsOpen() {
			return fmt.Errorf("device %s: DisableTXChecksum needs the node namespace (Env.NS)", d.spec.name)
		}
		if err := disableTXChecksum(env.NS, d.spec.name); err != nil {
			return fmt.Errorf("device %s: disable tx checksum offload: %w", d.spec.name, err)
		}
	}
	return nil
}

// Start binds own to the devices: its IPv4 subnet address as /32 on
// flannel.<VNI>, its IPv6 subnet address as /128 on flannel-v6.<VNI>
// (other addresses removed), and returns the Network. It programs no peer
// until the first Apply. It fails when Prepare was not called, own has no
// subnet, or own has a subnet of a family that was not prepared.
func (b *Backend) Start(ctx context.Context, own lease.Lease) (flannel.Network, error) {
	b.mu.Lock()
	env, ok := b.env, b.prepared
	devs := make([]*device, 0, len(b.devs))
	for _, d := range b.devs {
		c := *d
		devs = append(devs, &c)
	}
	b.mu.Unlock()
	if !ok {
		return nil, errors.New("vxlan: start: Prepare was not called")
	}
	if !own.Subnet.IsValid() && !own.IPv6Subnet.IsValid() {
		return nil, errors.New("vxlan: start: lease has no subnet")
	}
	n := newNetwork(env, own, b.opts, devs)
	for _, fam := range []struct {
		p  netip.Prefix
		v6 bool
	}{{own.Subnet, false}, {own.IPv6Subnet, true}} {
		if fam.p.IsValid() && n.dev(fam.v6) == nil {
			return nil, fmt.Errorf("vxlan: start: lease %s has a subnet of a family that was not prepared", own)
		}
	}
	var err error
	n.r.Locked(func() { err = n.ensureDevicesLocked() })
	if err != nil {
		return nil, fmt.Errorf("vxlan: start: %w", err)
	}
	return n, nil
}

// Cleanup deletes the devices flannel.<VNI> and flannel-v6.<VNI> (their
// neighbour and FDB entries and routes go with them) and the direct routes
// (backend.RouteProtocol) on the external interface. Missing ones are
// skipped; it is safe to call again.
func (b *Backend) Cleanup(ctx context.Context, env flannel.Env) error {
	if env.Handle == nil {
		return errors.New("vxlan: cleanup: no netlink handle")
	}
	var errs []error
	for _, v6 := range []bool{false, true} {
		name := deviceName(b.opts.VNI, v6)
		l, err := env.Handle.LinkByName(name)
		var nf netlink.LinkNotFoundError
		switch {
		case errors.As(err, &nf):
			continue
		case err != nil:
			errs = append(errs, fmt.Errorf("vxlan: cleanup: look up %s: %w", name, err))
			continue
		}
		if _, ok := l.(*netlink.Vxlan); !ok {
			continue // not ours
		}
		if err := env.Handle.LinkDel(l); err != nil && !errors.As(err, &nf) {
			errs = append(errs, fmt.Errorf("vxlan: cleanup: delete %s: %w", name, err))
		}
	}
	link, err := backend.ResolveLink(env.Handle, env.Iface)
	var nf netlink.LinkNotFoundError
	switch {
	case errors.As(err, &nf):
	case err != nil:
		errs = append(errs, fmt.Errorf("vxlan: cleanup: %w", err))
	default:
		rec := backend.RouteReconciler{Logger: backend.Logger(env.Logger)}
		if err := rec.Reconcile(ctx, env.Handle, link.Attrs().Index, nil); err != nil {
			errs = append(errs, fmt.Errorf("vxlan: cleanup routes on %s: %w", link.Attrs().Name, err))
		}
	}
	return errors.Join(errs...)
}
