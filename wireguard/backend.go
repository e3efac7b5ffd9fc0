package wireguard

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"syscall"

	"github.com/vishvananda/netlink"
	"golang.zx2c4.com/wireguard/wgctrl"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/lease"
)

// Backend is the wireguard flannel.Backend. Prepare must be called before
// Start; a Backend may be prepared and started again (a restarted Agent),
// keeping its key. It is safe for concurrent use.
type Backend struct {
	opts Options

	mu       sync.Mutex
	key      wgtypes.Key // valid when haveKey
	haveKey  bool
	env      flannel.Env
	devs     []devSpec
	prepared bool
}

var _ flannel.Backend = (*Backend)(nil)

// New returns a wireguard backend. It fails (wrapping
// lease.ErrInvalidConfig, naming the option) when an option is out of
// range; it touches neither the kernel nor the key file.
func New(opts Options) (*Backend, error) {
	opts = opts.withDefaults()
	if err := opts.validate(); err != nil {
		return nil, err
	}
	return &Backend{opts: opts}, nil
}

// Type returns "wireguard".
func (b *Backend) Type() string { return Type }

// families are the address families the node runs: the configuration's,
// or for a hand-built Config without either flag, its public addresses'.
func families(env flannel.Env) (v4, v6 bool) {
	v4, v6 = env.Config.EnableIPv4, env.Config.EnableIPv6
	if !v4 && !v6 {
		v4, v6 = env.Iface.PublicIP.IsValid(), env.Iface.PublicIPv6.IsValid()
	}
	return v4, v6
}

// devices are the devices for the families in opts.Mode, with their MTUs
// from the underlay MTU.
func devices(opts Options, env flannel.Env) []devSpec {
	v4, v6 := families(env)
	mtu := opts.MTU
	if mtu == 0 {
		mtu = env.Iface.MTU
	}
	if opts.Mode != ModeSeparate {
		over := Overhead4
		if opts.Mode == ModeIPv6 || opts.Mode == ModeAuto && v6 && env.Iface.PublicIPv6.IsValid() {
			over = Overhead6
		}
		return []devSpec{{name: DeviceName, port: opts.ListenPort, v4: v4, v6: v6, mtu: mtu - over, single: true}}
	}
	var out []devSpec
	if v4 {
		out = append(out, devSpec{name: DeviceName, port: opts.ListenPort, v4: true, mtu: mtu - Overhead4})
	}
	if v6 {
		out = append(out, devSpec{name: DeviceNameV6, port: opts.ListenPortV6, v6: true, mtu: mtu - Overhead6})
	}
	return out
}

// Prepare checks the environment (a handle, an open namespace for wgctrl,
// the external interface with an address of every enabled family),
// enables forwarding, loads the private key (Options.KeyFile, made once
// when missing), and creates the devices with the key and listen ports
// (existing devices and their peers are kept: a restart changes nothing).
// A kernel without WireGuard yields an error wrapping ErrNoWireGuard. It
// returns the attributes to publish: the public addresses, and the public
// key and port in BackendData (IPv4) and BackendV6Data (IPv6). It may be
// called again.
func (b *Backend) Prepare(ctx context.Context, env flannel.Env) (lease.Attrs, error) {
	if env.Handle == nil {
		return lease.Attrs{}, errors.New("wireguard: prepare: no netlink handle")
	}
	if !env.NS.IsOpen() {
		return lease.Attrs{}, errors.New("wireguard: prepare: no namespace handle (Env.NS): wgctrl has no namespace-bound handle and needs one")
	}
	iface, err := backend.BindInterface(env.Handle, env.Iface, env.Config)
	if err != nil {
		return lease.Attrs{}, fmt.Errorf("wireguard: prepare: %w", err)
	}
	env.Iface = iface
	log := backend.Logger(env.Logger).With("backend", Type)
	v4, v6 := families(env)
	if v4 {
		if err := nlsafe.SetSysctl(env.NS, "net/ipv4/ip_forward", "1"); err != nil {
			return lease.Attrs{}, fmt.Errorf("wireguard: prepare: %w", err)
		}
	}
	if v6 {
		if err := nlsafe.SetSysctl(env.NS, "net/ipv6/conf/all/forwarding", "1"); err != nil {
			return lease.Attrs{}, fmt.Errorf("wireguard: prepare: %w", err)
		}
	}
	key, err := b.privateKey(log)
	if err != nil {
		return lease.Attrs{}, fmt.Errorf("wireguard: prepare: %w", err)
	}
	devs := devices(b.opts, env)
	if err := ensureDevices(env, devs, key, log); err != nil {
		return lease.Attrs{}, fmt.Errorf("wireguard: prepare: %w", err)
	}
	attrs, err := publish(b.opts, env, key.PublicKey(), v4, v6)
	if err != nil {
		return lease.Attrs{}, fmt.Errorf("wireguard: prepare: %w", err)
	}
	b.mu.Lock()
	b.env, b.devs, b.prepared = env, devs, true
	b.mu.Unlock()
	return attrs, nil
}

// publish renders the attributes: BackendData when IPv4 runs,
// BackendV6Data when IPv6 does, each with the port peers send to over
// that family (in the single-device modes the one device's port for
// both; upstream publishes ListenPortV6 there, a port nobody listens on).
func publish(o Options, env flannel.Env, pub wgtypes.Key, v4, v6 bool) (lease.Attrs, error) {
	attrs := lease.Attrs{BackendType: Type, PublicIP: env.Iface.PublicIP, PublicIPv6: env.Iface.PublicIPv6}
	var err error
	if v4 {
		if attrs.BackendData, err = marshalBackendData(pub, o.ListenPort); err != nil {
			return attrs, err
		}
	}
	if v6 {
		port := o.ListenPortV6
		if o.Mode != ModeSeparate {
			port = o.ListenPort
		}
		if attrs.BackendV6Data, err = marshalBackendData(pub, port); err != nil {
			return attrs, err
		}
	}
	return attrs, nil
}

// privateKey is the node's key: from Options.KeyFile (made there once),
// else made once per Backend.
func (b *Backend) privateKey(log *slog.Logger) (wgtypes.Key, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.opts.KeyFile != "" {
		k, created, err := loadOrCreateKey(b.opts.KeyFile)
		if err != nil {
			return wgtypes.Key{}, err
		}
		if created {
			log.Info("generated a new private key", "key_file", b.opts.KeyFile, "public_key", k.PublicKey().String())
		} else {
			log.Info("using the private key from its file", "key_file", b.opts.KeyFile, "public_key", k.PublicKey().String())
		}
		b.key, b.haveKey = k, true
		return k, nil
	}
	if !b.haveKey {
		k, err := wgtypes.GeneratePrivateKey()
		if err != nil {
			return wgtypes.Key{}, fmt.Errorf("generate private key: %w", err)
		}
		b.key, b.haveKey = k, true
		log.Info("generated a new private key (kept in memory only)", "public_key", k.PublicKey().String())
	}
	return b.key, nil
}

// ensureDevices creates the devices (or keeps them) and gives them the key
// and port.
func ensureDevices(env flannel.Env, devs []devSpec, key wgtypes.Key, log *slog.Logger) error {
	for _, d := range devs {
		if _, err := ensureLink(env.Handle, d, log); err != nil {
			return err
		}
	}
	return withClient(env.NS, func(c *wgctrl.Client) error {
		for _, d := range devs {
			st, err := deviceState(c, d.name)
			if err != nil {
				return err
			}
			if err := configureIdentity(c, st, key, d.port); err != nil {
				return err
			}
		}
		return nil
	})
}

// Start returns the Network for own: it puts the lease's addresses on the
// devices and routes the cluster network through them. Peers, including
// those a previous run left, are the first Apply's business. It fails when
// Prepare was not called or own has no subnet.
func (b *Backend) Start(ctx context.Context, own lease.Lease) (flannel.Network, error) {
	b.mu.Lock()
	env, devs, key, ok := b.env, b.devs, b.key, b.prepared
	b.mu.Unlock()
	if !ok {
		return nil, errors.New("wireguard: start: Prepare was not called")
	}
	if !own.Subnet.IsValid() && !own.IPv6Subnet.IsValid() {
		return nil, errors.New("wireguard: start: lease has no subnet")
	}
	n := newNetwork(env, own, b.opts, devs, key)
	if err := n.setup(ctx); err != nil {
		return nil, fmt.Errorf("wireguard: start: %w", err)
	}
	return n, nil
}

// Cleanup deletes both flannel WireGuard devices (their peers and routes
// go with them). The key file stays, as upstream leaves it. It is safe to
// call when nothing is there.
func (b *Backend) Cleanup(ctx context.Context, env flannel.Env) error {
	if env.Handle == nil {
		return errors.New("wireguard: cleanup: no netlink handle")
	}
	var errs []error
	for _, name := range []string{DeviceName, DeviceNameV6} {
		link, err := env.Handle.LinkByName(name)
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			continue
		}
		if err == nil {
			err = env.Handle.LinkDel(link)
		}
		if err != nil && !errors.As(err, &nf) {
			errs = append(errs, fmt.Errorf("delete device %s: %w", name, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("wireguard: cleanup: %w", err)
	}
	return nil
}

// CheckKernel reports whether the kernel behind h can create WireGuard
// devices: nil, or an error wrapping ErrNoWireGuard. Prepare makes the
// same check; callers use it to say early and clearly that wireguard
// cannot run. It creates and deletes a throwaway device.
func CheckKernel(h *netlink.Handle) error {
	const probe = "flannel-wgprobe"
	err := h.LinkAdd(&netlink.Wireguard{LinkAttrs: netlink.LinkAttrs{Name: probe}})
	if err != nil && noWireGuard(err) {
		return fmt.Errorf("%w: create device: %v", ErrNoWireGuard, err)
	}
	if err != nil && !errors.Is(err, syscall.EEXIST) {
		return fmt.Errorf("wireguard: probe device: %w", err)
	}
	if l, err := h.LinkByName(probe); err == nil {
		_ = h.LinkDel(l)
	}
	return nil
}
