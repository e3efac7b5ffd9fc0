package flannel

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/flannelkit/flannel/lease"
)

// LeaseStore is where nodes publish their subnet leases: the Kubernetes API,
// etcd, or memory. Implementations are safe for concurrent use, and pass
// the contract suite internal/storetest.
//
// A node is identified by lease.Config.Identity of its attributes (PublicIP
// when the network has IPv4, else PublicIPv6) in the etcd and memory
// stores, and by its Node in the Kubernetes store. Every store applies the
// valid-peer rule lease.Config.Peers: a lease outside the network, of
// another length, overlapping an older one or claiming this node's subnet
// is never counted for allocation nor delivered by Watch, and is warned
// about once per change to its value.
type LeaseStore interface {
	// Config returns the cluster network configuration.
	Config(ctx context.Context) (lease.Config, error)
	// Acquire returns this node's lease: its existing one when still valid,
	// else the requested previous subnet when free, else a new one. It
	// returns lease.ErrNoFreeSubnet when the network is full and
	// lease.ErrNotAssigned when the store has not assigned a subnet yet.
	Acquire(ctx context.Context, req lease.Request) (lease.Lease, error)
	// Keep holds own until ctx ends (renewing it where leases expire). It
	// returns nil on cancellation and an error wrapping lease.ErrLeaseLost
	// when the lease expired, was deleted or was taken.
	Keep(ctx context.Context, own lease.Lease) error
	// Watch calls fn with the full set of leases: first, after every gap,
	// and after every change. It returns nil when ctx ends. fn is called
	// from one goroutine at a time. A snapshot's leases are never written
	// after fn got them, and fn must not write them (lease.Snapshot).
	Watch(ctx context.Context, fn func(lease.Snapshot)) error
}

// LeaseReleaser is implemented by stores that can give a lease back (memory,
// etcd). Agent.Cleanup uses it; Kubernetes leases belong to the Node object.
type LeaseReleaser interface {
	Release(ctx context.Context, l lease.Lease) error
}

// LeaseFinder is implemented by stores that can look up the lease a node
// holds from a previous run (memory, etcd, Kubernetes). The Agent uses it
// before Backend.Prepare to pass Env.Previous, so a backend can restore
// state published with the lease (e.g. the vxlan VTEP MAC) when it has to
// recreate its devices.
type LeaseFinder interface {
	// FindOwn finds the lease the node with these attributes holds: by
	// PublicIP/PublicIPv6 (as Acquire reclaims it), or for the Kubernetes
	// store its own Node regardless of attrs. It changes nothing. It
	// returns false (and no error) when the node holds no lease.
	FindOwn(ctx context.Context, attrs lease.Attrs) (lease.Lease, bool, error)
}

// TrafficRules keeps a node's masquerade and forward rules (package rules
// implements it). An Agent given one calls Ensure once the lease is bound
// and subnet.env written, before it becomes ready; Run for as long as its
// own Run lasts (periodic repair); Cleanup from Agent.Cleanup.
type TrafficRules interface {
	// Ensure installs the rules for network cfg and the node's lease own.
	// It is called again with the same values on every Run.
	Ensure(ctx context.Context, cfg lease.Config, own lease.Lease) error
	// Run keeps the rules in place until ctx ends and returns nil then.
	Run(ctx context.Context) error
	// Cleanup removes the rules; safe to call when there are none.
	Cleanup(ctx context.Context) error
}

// Backend is a dataplane: it programs the kernel of one node.
type Backend interface {
	// Type is the backend's name in net-conf.json: "host-gw", "vxlan", "ipsec".
	Type() string
	// Prepare sets up node-local state that does not depend on the lease
	// (devices, MAC addresses, keys) and returns the attributes to publish
	// with the lease (BackendType and BackendData at least).
	Prepare(ctx context.Context, env Env) (lease.Attrs, error)
	// Start binds the lease (addresses, MTU) and returns the Network that
	// reconciles peers. Prepare must have been called.
	Start(ctx context.Context, own lease.Lease) (Network, error)
	// Cleanup removes everything the backend created on the node described
	// by env. It is safe to call when nothing is there.
	Cleanup(ctx context.Context, env Env) error
}

// Network is a started dataplane bound to a lease.
type Network interface {
	// Lease returns the lease the network was started with.
	Lease() lease.Lease
	// MTU is the MTU pods on this node should use.
	MTU() int
	// Apply makes the kernel match peers (the other nodes' leases): missing
	// entries are added, wrong ones fixed, stale ones deleted. It is
	// level-triggered and may be called repeatedly with the same peers; it
	// changes nothing then. A peer that cannot be programmed yields a
	// *PeerError in the returned error (errors.Join) without stopping the
	// others. peers is read-only: the Agent may hand on the store's
	// snapshot without a copy, and a backend may keep it until the next
	// Apply.
	Apply(ctx context.Context, peers []lease.Lease) error
	// Run repairs drift (periodically and on kernel events) until ctx ends,
	// and returns nil then.
	Run(ctx context.Context) error
}

// Env is what a backend needs to know about the node it runs on.
type Env struct {
	// Config is the cluster network configuration.
	Config lease.Config
	// Iface is the external (underlay) interface.
	Iface ExternalInterface
	// Handle is a netlink handle bound to the node's network namespace.
	// Every kernel operation goes through it. Required.
	Handle *netlink.Handle
	// NS is the node's network namespace, for what has no netlink handle
	// (sysctls). Optional: when not open, sysctls are left alone.
	NS netns.NsHandle
	// Logger receives the backend's logs; nil discards.
	Logger *slog.Logger
	// Previous is this node's lease as the store still holds it from a
	// previous run (LeaseFinder), zero when none. A backend may restore
	// what it published then (e.g. MAC addresses) when it has to recreate
	// its devices. Optional.
	Previous lease.Lease
	// Publish, when set (the Agent sets it), publishes new attributes
	// with the node's lease while the network runs: a backend whose
	// published data changes (ipsec's rekeyed public key) calls it. It
	// never blocks; when called again before the store was updated, the
	// latest attributes win. Optional: nil means the caller cannot
	// republish, and such a backend keeps its data until restarted.
	Publish func(lease.Attrs)
}

// ExternalInterface is the node's underlay interface and the addresses it
// publishes. backend.FindInterface fills it.
type ExternalInterface struct {
	Name  string
	Index int
	MTU   int
	// IP and IPv6 are addresses on the interface; invalid when absent.
	IP   netip.Addr
	IPv6 netip.Addr
	// PublicIP and PublicIPv6 are what peers use to reach this node: IP and
	// IPv6 unless overridden (e.g. behind NAT).
	PublicIP   netip.Addr
	PublicIPv6 netip.Addr
}

// PeerError reports a peer that a Network could not program, naming it.
type PeerError struct {
	Lease lease.Lease
	Err   error
}

func (e *PeerError) Error() string {
	return fmt.Sprintf("peer %s (public ip %s): %v", e.Lease, peerIP(e.Lease), e.Err)
}

func (e *PeerError) Unwrap() error { return e.Err }

func peerIP(l lease.Lease) string {
	switch {
	case l.Attrs.PublicIP.IsValid() && l.Attrs.PublicIPv6.IsValid():
		return l.Attrs.PublicIP.String() + "," + l.Attrs.PublicIPv6.String()
	case l.Attrs.PublicIPv6.IsValid():
		return l.Attrs.PublicIPv6.String()
	default:
		return l.Attrs.PublicIP.String()
	}
}
