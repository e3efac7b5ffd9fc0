package alloc

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"sync"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
)

// Type is the backend's name in net-conf.json.
const Type = "alloc"

// Backend is the alloc flannel.Backend. It is safe for concurrent use and
// may be prepared and started again.
type Backend struct {
	mu       sync.Mutex
	iface    flannel.ExternalInterface
	prepared bool
}

var (
	_ flannel.Backend = (*Backend)(nil)
	_ flannel.Network = (*Network)(nil)
)

// New returns an alloc backend.
func New() *Backend { return &Backend{} }

// FromConfig builds an alloc backend from the network configuration, for a
// backend.Registry. alloc has no settings: any key of the "Backend" object
// other than "Type" is an error wrapping lease.ErrInvalidConfig that names
// the key.
func FromConfig(cfg lease.Config) (flannel.Backend, error) {
	if cfg.BackendType != "" && cfg.BackendType != Type {
		return nil, fmt.Errorf("%w: Backend.Type %q is not %q", lease.ErrInvalidConfig, cfg.BackendType, Type)
	}
	raw := bytes.TrimSpace(cfg.Backend)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return New(), nil
	}
	var keys map[string]json.RawMessage
	if err := json.Unmarshal(raw, &keys); err != nil {
		return nil, fmt.Errorf("%w: Backend: %v", lease.ErrInvalidConfig, err)
	}
	for k := range keys {
		if !strings.EqualFold(k, "Type") {
			return nil, fmt.Errorf("%w: Backend.%s: unknown key for the %s backend (it has no settings)", lease.ErrInvalidConfig, k, Type)
		}
	}
	return New(), nil
}

// Type returns "alloc".
func (b *Backend) Type() string { return Type }

// Prepare records the external interface and returns the attributes to
// publish: BackendType "alloc" and the interface's public addresses (the
// Agent fills them in when the interface has none of its own). It touches
// no kernel state, reads nothing through env.Handle and may be called
// again. The MTU reported later is env.Iface.MTU as given.
func (b *Backend) Prepare(ctx context.Context, env flannel.Env) (lease.Attrs, error) {
	b.mu.Lock()
	b.iface, b.prepared = env.Iface, true
	b.mu.Unlock()
	return lease.Attrs{
		BackendType: Type,
		PublicIP:    env.Iface.PublicIP,
		PublicIPv6:  env.Iface.PublicIPv6,
	}, nil
}

// Start returns the Network for own. It fails when Prepare was not called
// or own has no subnet.
func (b *Backend) Start(ctx context.Context, own lease.Lease) (flannel.Network, error) {
	b.mu.Lock()
	iface, ok := b.iface, b.prepared
	b.mu.Unlock()
	if !ok {
		return nil, fmt.Errorf("%s: start: Prepare was not called", Type)
	}
	if !own.Subnet.IsValid() && !own.IPv6Subnet.IsValid() {
		return nil, fmt.Errorf("%s: start: lease has no subnet", Type)
	}
	return &Network{own: own, mtu: iface.MTU}, nil
}

// Cleanup does nothing: alloc creates nothing on the node.
func (b *Backend) Cleanup(ctx context.Context, env flannel.Env) error { return nil }

// Network is a started alloc network: a lease and nothing else.
type Network struct {
	own lease.Lease
	mtu int
}

// Lease returns the lease the network was started with.
func (n *Network) Lease() lease.Lease { return n.own }

// MTU is the external interface's MTU, as upstream reports it: alloc adds
// no header, and whatever routes the pod traffic decides the real one.
func (n *Network) MTU() int { return n.mtu }

// Apply ignores peers: routing to them is someone else's job. It always
// returns nil.
func (n *Network) Apply(ctx context.Context, peers []lease.Lease) error { return nil }

// Run waits for ctx to end and returns nil: there is nothing to repair.
func (n *Network) Run(ctx context.Context) error {
	<-ctx.Done()
	return nil
}
