package ipsec

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/lease"
)

// Network is a started ipsec dataplane. Apply, Rekey and the repairs of
// Run are serialized by its backend.Reconciler; it is safe for concurrent
// use.
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

	r     *backend.Reconciler // its lock guards book, own.Attrs and epoch
	book  keyBook
	epoch uint64    // of our current key
	tick  tickState // Run's loop only
}

// tickState is what Run's loop remembers between ticks.
type tickState struct {
	lastRepair, lastRekey time.Time
	postponed             bool // a due rekey waits for the previous key's retirement
}

var _ flannel.Network = (*Network)(nil)

func newNetwork(env flannel.Env, own lease.Lease, opts Options, key keyPair) *Network {
	log := backend.Logger(env.Logger).With("backend", Type, "iface", env.Iface.Name)
	n := &Network{
		env:  env,
		own:  own,
		opts: opts,
		log:  log,
		x:    kernel{h: env.Handle, reqid: opts.Reqid, cipher: opts.Cipher, limits: opts.limits},
		rec:  backend.RouteReconciler{Logger: log},
		now:  time.Now,
		key:  newKeyPair,
		book: newKeyBook(log, opts, key),
	}
	n.routes = n.reconcileRoutes
	n.r = backend.NewReconciler(backend.ReconcilerConfig{
		Apply:        n.applyLocked,
		BeforeRepair: n.beforeRepair,
		// The loop ticks often enough to switch and retire keys on time
		// during a grace period; outside one it repairs every
		// RepairInterval (beforeRepair).
		Interval: max(min(opts.RepairInterval, opts.Grace/4), 10*time.Millisecond),
		Logger:   log,
	})
	return n
}

// Lease returns the lease the network was started with, with the
// attributes it published last (a rekey's, or BackendData bound to the
// lease by Start).
func (n *Network) Lease() lease.Lease {
	var l lease.Lease
	n.r.Locked(func() { l = n.own })
	return l
}

// bindOwn makes the own lease's BackendData the current key's, bound to
// the lease, and publishes it when it changed and Options.Publish is set.
func (n *Network) bindOwn() error {
	var attrs lease.Attrs
	var err error
	changed := false
	n.r.Locked(func() {
		var data []byte
		data, err = marshalBackendData(n.opts.PSK, bindingOf(n.own, n.book.keys.cur.pub, n.epoch))
		if err == nil && !bytes.Equal(data, n.own.Attrs.BackendData) {
			n.own.Attrs.BackendData = data
			attrs, changed = n.own.Attrs, true
		}
	})
	if err != nil {
		return err
	}
	if changed && n.opts.Publish != nil {
		n.log.Info("publishing the key bound to the lease")
		n.opts.Publish(attrs)
	}
	return nil
}

// MTU is the external MTU minus the ESP tunnel overhead of the cipher (the
// IPv6 overhead when the node has an IPv6 subnet).
func (n *Network) MTU() int {
	return MTU(n.env.Iface.MTU, n.own.IPv6Subnet.IsValid(), n.opts.UDPEncap, n.opts.Cipher)
}

// PublicKey returns the node's current public key (for tests and status).
func (n *Network) PublicKey() []byte {
	var pub []byte
	n.r.Locked(func() { pub = slices.Clone(n.book.keys.cur.pub) })
	return pub
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
	return n.r.Apply(ctx, peers)
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
	var attrs lease.Attrs
	n.r.Update(ctx, "rekey", func() {
		epoch := nextEpoch(n.epoch, n.now())
		var data []byte
		data, err = marshalBackendData(n.opts.PSK, bindingOf(n.own, key.pub, epoch))
		if err != nil {
			return
		}
		n.book.rekey(key, n.now())
		n.epoch = epoch
		attrs = n.own.Attrs
		attrs.BackendData = data
		n.own.Attrs = attrs
		n.log.Info("rekeyed; publishing new public key")
	})
	if err != nil {
		return lease.Attrs{}, fmt.Errorf("ipsec: rekey: %w", err)
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
		watchers = append(watchers, backend.NetlinkWatcher(n.log, n.env.NS, "xfrm", nlsafe.SubscribeXfrm, removal))
	} else {
		n.log.Info("no namespace handle: repairing on a timer only", "interval", n.opts.RepairInterval)
	}
	n.tick = tickState{lastRepair: n.now(), lastRekey: n.now()}
	n.r.Run(ctx, watchers...)
	return nil
}

// beforeRepair is the Reconciler's BeforeRepair: a repair a watcher asked
// for runs at once; on a tick it first rekeys when one is due, was
// postponed or is asked for early by the key book, then lets the repair run while a rekey is in its grace
// period or when RepairInterval has passed since the last one.
func (n *Network) beforeRepair(ctx context.Context, why string) bool {
	t := &n.tick
	if why != backend.Periodic {
		t.lastRepair = n.now()
		return true
	}
	var early bool
	n.r.Locked(func() { early = n.book.earlyRekey })
	if n.opts.Publish != nil && (t.postponed || early || n.now().Sub(t.lastRekey) >= n.opts.RekeyInterval) {
		t.postponed = !n.rekeyAndPublish(ctx, t.postponed)
		if !t.postponed {
			t.lastRekey = n.now()
		}
	}
	var inGrace bool
	n.r.Locked(func() { inGrace = n.book.inGrace() })
	if !inGrace && n.now().Sub(t.lastRepair) < n.opts.RepairInterval {
		return false
	}
	t.lastRepair = n.now()
	return true
}

// rekeyAndPublish rekeys and hands the new attributes to Options.Publish,
// unless peers still send with the key the last rekey replaced: then it
// reports false (logging it unless quiet, the rekey having already been
// postponed). A failed rekey is logged and counts as done.
func (n *Network) rekeyAndPublish(ctx context.Context, quiet bool) bool {
	var pending bool
	n.r.Locked(func() { pending = n.book.pending() })
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

// closeClusterNetwork programs the allow and block policies, which do not
// depend on peers. Policies of a previous run are left to the first Apply.
func (n *Network) closeClusterNetwork() error {
	var errs []error
	n.r.Locked(func() {
		_, policies, _ := desired(n.baseInput())
		for _, p := range policies {
			errs = append(errs, n.x.upsertPolicy(p))
		}
	})
	return errors.Join(errs...)
}
