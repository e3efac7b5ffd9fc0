package ipsec

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/vishvananda/netlink"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/lease"
)

// Backend is the ipsec flannel.Backend. Every Prepare makes a fresh key
// pair, so a restarted agent never reuses keys. It is safe for concurrent
// use.
type Backend struct {
	opts Options

	mu       sync.Mutex
	env      flannel.Env
	key      keyPair
	epoch    uint64
	prepared bool
}

var _ flannel.Backend = (*Backend)(nil)

// New returns an ipsec backend. It fails (wrapping lease.ErrInvalidConfig)
// when the PSK is missing or too short or the cipher is unsupported.
func New(opts Options) (*Backend, error) {
	opts = opts.withDefaults()
	if err := opts.validate(); err != nil {
		return nil, err
	}
	return &Backend{opts: opts}, nil
}

// Type returns "ipsec".
func (b *Backend) Type() string { return Type }

// ErrNoESP is wrapped by Prepare's error when the kernel cannot do ESP
// with the configured cipher (no esp4/xfrm_user module or no AES-GCM).
var ErrNoESP = errors.New("kernel lacks ESP/XFRM support (modules esp4, esp6, xfrm_user and rfc4106(gcm(aes)) needed)")

// Prepare checks the environment, enables IP forwarding in env.NS when it
// is open, probes that the kernel accepts an ESP state with the cipher
// (ErrNoESP otherwise), makes a fresh X25519 key pair and returns the
// attributes to publish: the public addresses and BackendData with the
// public key and its PSK authentication tag.
func (b *Backend) Prepare(ctx context.Context, env flannel.Env) (lease.Attrs, error) {
	if env.Handle == nil {
		return lease.Attrs{}, errors.New("ipsec: prepare: no netlink handle")
	}
	iface, err := backend.BindInterface(env.Handle, env.Iface, env.Config)
	if err != nil {
		return lease.Attrs{}, fmt.Errorf("ipsec: prepare: %w", err)
	}
	env.Iface = iface
	if err := probeESP(env.Handle, b.opts); err != nil {
		return lease.Attrs{}, fmt.Errorf("ipsec: prepare: %w", err)
	}
	if env.NS.IsOpen() {
		if env.Config.EnableIPv4 || env.Iface.PublicIP.IsValid() {
			if err := nlsafe.SetSysctl(env.NS, "net/ipv4/ip_forward", "1"); err != nil {
				return lease.Attrs{}, fmt.Errorf("ipsec: prepare: %w", err)
			}
		}
		if env.Config.EnableIPv6 {
			if err := nlsafe.SetSysctl(env.NS, "net/ipv6/conf/all/forwarding", "1"); err != nil {
				return lease.Attrs{}, fmt.Errorf("ipsec: prepare: %w", err)
			}
		}
	}
	key, err := newKeyPair()
	if err != nil {
		return lease.Attrs{}, fmt.Errorf("ipsec: prepare: %w", err)
	}
	// The tag binds the key to the lease; the subnets are not known yet:
	// those of the previous lease (usually acquired again), else Start
	// binds and publishes again.
	epoch := nextEpoch(epochOf(env.Previous.Attrs.BackendData), time.Now())
	attrs := lease.Attrs{BackendType: Type, PublicIP: env.Iface.PublicIP, PublicIPv6: env.Iface.PublicIPv6}
	bind := lease.Lease{Subnet: env.Previous.Subnet, IPv6Subnet: env.Previous.IPv6Subnet, Attrs: attrs}
	attrs.BackendData, err = marshalBackendData(b.opts.PSK, bindingOf(bind, key.pub, epoch))
	if err != nil {
		return lease.Attrs{}, fmt.Errorf("ipsec: prepare: %w", err)
	}
	b.mu.Lock()
	b.env, b.key, b.epoch, b.prepared = env, key, epoch, true
	b.mu.Unlock()
	return attrs, nil
}

// Start returns the Network for own, using the key pair of the last
// Prepare; every Start needs a Prepare of its own (a fresh key pair). When
// own's subnets or public addresses are not those Prepare bound the key's
// auth tag to, the Network's lease (Network.Lease) carries BackendData
// bound to own, published through Options.Publish when set; peers refuse
// the node until they see it.
// Before returning it programs the allow policy for the own subnet and the
// block policy for the rest of the cluster network, so pods started before
// the first Apply cannot send cluster traffic in clear; peers are
// programmed by Apply.
func (b *Backend) Start(ctx context.Context, own lease.Lease) (flannel.Network, error) {
	b.mu.Lock()
	env, key, epoch, ok := b.env, b.key, b.epoch, b.prepared
	b.mu.Unlock()
	if !ok {
		return nil, errors.New("ipsec: start: Prepare was not called since the last Start")
	}
	if !own.Subnet.IsValid() && !own.IPv6Subnet.IsValid() {
		return nil, errors.New("ipsec: start: lease has no subnet")
	}
	// A key pair serves one Network: a second one with the same key could
	// install an outbound state again with a restarted sequence number.
	b.mu.Lock()
	b.prepared = false
	b.mu.Unlock()
	// The Agent passes Env.Publish: rekeyed keys then reach the store.
	opts := b.opts
	if opts.Publish == nil {
		opts.Publish = env.Publish
	}
	n := newNetwork(env, own, opts, key)
	n.epoch = epoch
	if err := n.bindOwn(); err != nil {
		return nil, fmt.Errorf("ipsec: start: %w", err)
	}
	if err := n.closeClusterNetwork(); err != nil {
		return nil, fmt.Errorf("ipsec: start: %w", err)
	}
	return n, nil
}

// Cleanup removes every XFRM state and policy of ours (Options.Reqid and
// our priorities) and our routes on the external interface. It is safe to
// call when nothing is there. Removing the block policy re-opens the
// cluster network to plain-text traffic: only call it when the node leaves.
func (b *Backend) Cleanup(ctx context.Context, env flannel.Env) error {
	if env.Handle == nil {
		return errors.New("ipsec: cleanup: no netlink handle")
	}
	k := kernel{h: env.Handle, reqid: b.opts.Reqid}
	var errs []error
	if pols, err := k.policies(); err != nil {
		errs = append(errs, err)
	} else {
		for _, p := range pols {
			errs = append(errs, k.delPolicy(p))
		}
	}
	if sts, err := k.states(); err != nil {
		errs = append(errs, err)
	} else {
		for _, s := range sts {
			errs = append(errs, k.delState(s))
		}
	}
	link, err := backend.ResolveLink(env.Handle, env.Iface)
	if err == nil {
		rec := backend.RouteReconciler{Logger: backend.Logger(env.Logger)}
		errs = append(errs, rec.Reconcile(ctx, env.Handle, link.Attrs().Index, nil))
	} else {
		var nf netlink.LinkNotFoundError
		if !errors.As(err, &nf) {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("ipsec: cleanup: %w", err)
	}
	return nil
}
