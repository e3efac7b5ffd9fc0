package ipsec

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"time"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/lease"
)

// Network is a started ipsec dataplane. Apply, Rekey and the repairs of
// Run are serialized; it is safe for concurrent use.
type Network struct {
	env  flannel.Env
	own  lease.Lease
	opts Options
	log  *slog.Logger
	x    xfrm
	rec  backend.RouteReconciler
	now  func() time.Time
	key  func() (keyPair, error) // a fresh key pair (newKeyPair; tests make known ones)
	// routes routes the valid peers' subnets (reconcileRoutes; the
	// sequence tests, which have no kernel, record them instead).
	routes func(ctx context.Context, in input, failed map[int]error) error

	mu      sync.Mutex
	peers   []lease.Lease
	applied bool
	book    keyBook
}

var _ flannel.Network = (*Network)(nil)

func newNetwork(env flannel.Env, own lease.Lease, opts Options, key keyPair) *Network {
	log := logger(env.Logger).With("backend", Type, "iface", env.Iface.Name)
	n := &Network{
		env:  env,
		own:  own,
		opts: opts,
		log:  log,
		x:    kernel{h: env.Handle, reqid: opts.Reqid, cipher: opts.Cipher},
		rec:  backend.RouteReconciler{Logger: log},
		now:  time.Now,
		key:  newKeyPair,
		book: newKeyBook(log, opts, key),
	}
	n.routes = n.reconcileRoutes
	return n
}

// Lease returns the lease the network was started with.
func (n *Network) Lease() lease.Lease { return n.own }

// MTU is the external MTU minus the ESP tunnel overhead of the cipher (the
// IPv6 overhead when the node has an IPv6 subnet).
func (n *Network) MTU() int {
	return MTU(n.env.Iface.MTU, n.own.IPv6Subnet.IsValid(), n.opts.UDPEncap, n.opts.Cipher)
}

// PublicKey returns the node's current public key (for tests and status).
func (n *Network) PublicKey() []byte {
	n.mu.Lock()
	defer n.mu.Unlock()
	return slices.Clone(n.book.keys.cur.pub)
}

// Apply makes the XFRM states, policies and routes match peers (the other
// nodes' leases): per peer and family an outbound and inbound ESP state,
// out/in/fwd policies between the pod subnets and a route for the peer's
// subnet; plus an allow policy for the own subnet and a block policy for
// the rest of the cluster network. Ours that are not wanted, including
// those of a previous run, are deleted. Leases of other backend types are
// skipped. A peer whose key is missing, malformed or not authenticated with
// our PSK (ErrPeerAuth) yields a *flannel.PeerError and gets no states, so
// traffic to it is blocked. Apply may be called repeatedly with the same
// peers; it changes nothing then.
func (n *Network) Apply(ctx context.Context, peers []lease.Lease) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	n.peers = slices.Clone(peers)
	n.applied = true
	return n.applyLocked(ctx)
}

// Rekey makes a fresh key pair, installs inbound states for it next to the
// old ones and returns the attributes to publish with the lease. The caller
// must publish them (Run passes them to Options.Publish). Outbound to a
// peer keeps the old key until the peer shows it has seen the new one (see
// the package doc); the old key is retired after Options.Grace once no
// peer still sends with it, and after RekeyInterval at the latest.
func (n *Network) Rekey(ctx context.Context) (lease.Attrs, error) {
	key, err := n.key()
	if err != nil {
		return lease.Attrs{}, fmt.Errorf("ipsec: rekey: %w", err)
	}
	data, err := marshalBackendData(n.opts.PSK, key.pub)
	if err != nil {
		return lease.Attrs{}, fmt.Errorf("ipsec: rekey: %w", err)
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	n.book.rekey(key, n.now())
	attrs := n.own.Attrs
	attrs.BackendData = data
	n.own.Attrs = attrs
	n.log.Info("rekeyed; publishing new public key")
	if n.applied {
		if err := n.applyLocked(ctx); err != nil {
			n.log.Warn("apply after rekey", "err", err)
		}
	}
	return attrs, nil
}

// Run repairs drift until ctx ends: it re-applies the last peer set every
// RepairInterval (and more often while a rekey is in its grace period, to
// switch and retire keys on time) and right after the kernel reports an
// XFRM state or policy deleted, flushed or expired (a subscription in
// env.NS, retried with backoff when it fails), rekeys every RekeyInterval when
// Options.Publish is set, and with UDPEncap holds the UDP port 4500 socket
// the kernel needs to decapsulate ESP in UDP. It returns nil when ctx
// ends, with every goroutine joined.
func (n *Network) Run(ctx context.Context) error {
	if n.opts.UDPEncap {
		closeSock, err := openEncapSocket(n.env.NS)
		if err != nil {
			n.log.Warn("udp encapsulation socket", "err", err)
		} else {
			defer closeSock()
		}
	}
	// Removals of states and policies (by hand, a flush, an expiry) are
	// repaired right away; the periodic repair covers the rest.
	var watchers []backend.Watcher
	if n.env.NS.IsOpen() {
		watchers = append(watchers, backend.NetlinkWatcher(n.log, n.env.NS, "xfrm", subscribeXfrm, xfrmEvent.removal))
	} else {
		n.log.Info("no namespace handle: repairing on a timer only", "interval", n.opts.RepairInterval)
	}
	// The loop ticks often enough to switch and retire keys on time during
	// a grace period; outside one it repairs every RepairInterval.
	tick := max(min(n.opts.RepairInterval, n.opts.Grace/4), 10*time.Millisecond)
	lastRepair, lastRekey := n.now(), n.now()
	postponed := false // a due rekey waits for the previous key's retirement
	backend.RepairLoop(ctx, tick, func(ctx context.Context, why string) {
		if why != "periodic" {
			lastRepair = n.now()
			n.repair(ctx, why)
			return
		}
		if n.opts.Publish != nil && (postponed || n.now().Sub(lastRekey) >= n.opts.RekeyInterval) {
			postponed = !n.rekeyAndPublish(ctx, postponed)
			if !postponed {
				lastRekey = n.now()
			}
		}
		n.mu.Lock()
		inGrace := n.book.inGrace()
		n.mu.Unlock()
		if !inGrace && n.now().Sub(lastRepair) < n.opts.RepairInterval {
			return
		}
		lastRepair = n.now()
		n.repair(ctx, why)
	}, watchers...)
	return nil
}

// rekeyAndPublish rekeys and hands the new attributes to Options.Publish,
// unless peers still send with the key the last rekey replaced: then it
// reports false (logging it unless quiet, the rekey having already been
// postponed). A failed rekey is logged and counts as done.
func (n *Network) rekeyAndPublish(ctx context.Context, quiet bool) bool {
	n.mu.Lock()
	pending := n.book.pending()
	n.mu.Unlock()
	if pending {
		if !quiet {
			n.log.Info("rekey postponed: peers still send with the key the last rekey replaced")
		}
		return false
	}
	attrs, err := n.Rekey(ctx)
	if err != nil {
		n.log.Warn("rekey failed", "err", err)
		return true
	}
	n.opts.Publish(attrs)
	return true
}

func (n *Network) repair(ctx context.Context, why string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.applied {
		return
	}
	if err := n.applyLocked(ctx); err != nil && ctx.Err() == nil {
		n.log.Warn("repair failed", "trigger", why, "err", err)
	}
}

// closeClusterNetwork programs the allow and block policies, which do not
// depend on peers. Policies of a previous run are left to the first Apply.
func (n *Network) closeClusterNetwork() error {
	n.mu.Lock()
	defer n.mu.Unlock()
	_, policies, _ := desired(n.baseInput())
	var errs []error
	for _, p := range policies {
		errs = append(errs, n.x.upsertPolicy(p))
	}
	return errors.Join(errs...)
}
