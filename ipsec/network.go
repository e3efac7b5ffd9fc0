package ipsec

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"sync"
	"time"

	"github.com/vishvananda/netlink"

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

	mu        sync.Mutex
	peers     []lease.Lease
	applied   bool
	keys      localKeys
	rekeyedAt time.Time
	peerKeys  map[string]*peerKey   // by lease key
	badKeys   map[string]string     // lease key -> BackendData last warned about
	outGen    map[string]uint8      // pairName -> generation of our outbound state
	outSeen   map[stateID]bool      // outbound states we installed
	exhausted map[string]bool       // pairName out of generations
	use       map[string]*keyUse    // by lease key: peers' use of our keys since the rekey
	linger    map[stateID]time.Time // replaced outbound states kept until then
}

// outLinger is how long an outbound state replaced by one for the same
// peer (a key switch) stays installed: a packet already routed through it
// is dropped if it vanishes under it, while new packets take the newer
// state at once.
const outLinger = time.Second

// keyUse is what a peer's traffic has shown about our keys since our last
// rekey, from the packet counters of our inbound states.
type keyUse struct {
	knowsCur    bool      // it sent with our current key, so it has seen it
	prevPackets uint64    // packets it sent with our previous key, at the last look
	prevUsedAt  time.Time // when that count last grew (the rekey time at first)
}

// peerKey tracks a peer's published key and the one it replaced.
type peerKey struct {
	cur, prev []byte
	changed   time.Time
}

var _ flannel.Network = (*Network)(nil)

func newNetwork(env flannel.Env, own lease.Lease, opts Options, key keyPair) *Network {
	log := logger(env.Logger).With("backend", Type, "iface", env.Iface.Name)
	n := &Network{
		env:       env,
		own:       own,
		opts:      opts,
		log:       log,
		x:         kernel{h: env.Handle, reqid: opts.Reqid, cipher: opts.Cipher},
		rec:       backend.RouteReconciler{Logger: log},
		now:       time.Now,
		key:       newKeyPair,
		keys:      localKeys{cur: key},
		peerKeys:  map[string]*peerKey{},
		badKeys:   map[string]string{},
		outGen:    map[string]uint8{},
		outSeen:   map[stateID]bool{},
		exhausted: map[string]bool{},
		use:       map[string]*keyUse{},
		linger:    map[stateID]time.Time{},
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
	return slices.Clone(n.keys.cur.pub)
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

func (n *Network) ownIPs() (v4, v6 netip.Addr) {
	v4, v6 = n.env.Iface.IP, n.env.Iface.IPv6
	if !v4.IsValid() {
		v4 = n.env.Iface.PublicIP
	}
	if !v6.IsValid() {
		v6 = n.env.Iface.PublicIPv6
	}
	return v4, v6
}

func (n *Network) applyLocked(ctx context.Context) error {
	now := n.now()
	n.retirePrevLocked(now)

	v4, v6 := n.ownIPs()
	in := input{
		psk:      n.opts.PSK,
		cipher:   n.opts.Cipher,
		encap:    n.opts.UDPEncap,
		cluster:  n.env.Config.Network,
		cluster6: n.env.Config.IPv6Network,
		own:      nodeView{Subnet: n.own.Subnet, Subnet6: n.own.IPv6Subnet, IP: v4, IP6: v6},
		keys:     n.keys,
	}
	if !in.cluster.IsValid() && n.own.Subnet.IsValid() {
		in.cluster = n.own.Subnet // a hand-built Config: block at least the own subnet's peers
	}
	failed := map[int]error{}
	var idx []int // input peer -> n.peers index
	seen := map[string]bool{}
	present := map[string]bool{}
	for i, p := range n.peers {
		if p.Attrs.BackendType != Type {
			n.log.Debug("skipping peer of another backend", "subnet", p.String(), "backend_type", p.Attrs.BackendType)
			continue
		}
		if p.SameSubnets(n.own) {
			continue
		}
		present[p.Key()] = true
		v := nodeView{Subnet: p.Subnet, Subnet6: p.IPv6Subnet, IP: p.Attrs.PublicIP, IP6: p.Attrs.PublicIPv6}
		pub, err := parsePeerKey(n.opts.PSK, p.Attrs.BackendData)
		ok := err == nil
		if err != nil {
			failed[len(in.peers)] = err
			if n.badKeys[p.Key()] != string(p.Attrs.BackendData) {
				n.badKeys[p.Key()] = string(p.Attrs.BackendData)
				n.log.Warn("peer not programmed: its key is unusable; traffic to it stays blocked",
					"subnet", p.String(), "public_ip", p.Attrs.PublicIP, "err", err)
			}
		} else {
			delete(n.badKeys, p.Key())
			key := p.Key()
			seen[key] = true
			pk := n.peerKeys[key]
			switch {
			case pk == nil:
				pk = &peerKey{cur: pub}
				n.peerKeys[key] = pk
			case !bytes.Equal(pk.cur, pub):
				pk.prev, pk.cur, pk.changed = pk.cur, pub, now
				n.log.Info("peer key changed", "subnet", p.String())
			}
			if pk.prev != nil && now.Sub(pk.changed) >= n.opts.Grace {
				pk.prev = nil
			}
			v.Cur, v.Prev = pk.cur, pk.prev
			v.SendPrev = n.sendPrevLocked(key, now)
		}
		in.peers = append(in.peers, v)
		in.valid = append(in.valid, ok)
		idx = append(idx, i)
	}
	for key := range n.peerKeys {
		if !seen[key] {
			delete(n.peerKeys, key)
		}
	}
	for key := range n.use {
		if !seen[key] {
			delete(n.use, key)
		}
	}
	for key := range n.badKeys {
		if !present[key] {
			delete(n.badKeys, key)
		}
	}
	var rest []error
	have, err := n.x.states()
	if err != nil {
		return fmt.Errorf("ipsec: %w", err)
	}
	havePol, err := n.x.policies()
	if err != nil {
		return fmt.Errorf("ipsec: %w", err)
	}
	haveIDs := make(map[stateID]bool, len(have))
	for _, s := range have {
		haveIDs[s.id()] = true
	}
	in.outGen = n.outGen
	states, policies, failed2 := desired(in)
	// What the peers' traffic shows about our keys may switch outbound.
	if n.keys.prev != nil && n.observeUseLocked(in, idx, states, have, now) {
		states, policies, failed2 = desired(in)
	}
	// An outbound state of ours that vanished (deleted by hand, flushed)
	// must not come back with the same key: its sequence number, and so
	// the GCM nonce, would start over. Move to the next generation.
	bumped := false
	for _, s := range states {
		if !s.Out || !n.outSeen[s.id()] || haveIDs[s.id()] {
			continue
		}
		delete(n.outSeen, s.id())
		if n.outGen[s.Pair]+1 < Generations {
			n.outGen[s.Pair]++
			bumped = true
			n.log.Warn("outbound esp state vanished; installing a new one with a fresh SPI and key", "peer_ip", s.Dst, "generation", n.outGen[s.Pair])
		} else {
			n.exhausted[s.Pair] = true
		}
	}
	if bumped {
		states, policies, failed2 = desired(in)
	}
	for i, err := range failed2 {
		if _, ok := failed[i]; !ok {
			failed[i] = err
		}
	}
	states = slices.DeleteFunc(states, func(s xstate) bool {
		if s.Out && n.exhausted[s.Pair] {
			failed[s.Peer] = errors.Join(failed[s.Peer], errors.New("outbound esp state was deleted too often for this key; traffic stays blocked until the next rekey or restart"))
			return true
		}
		return false
	})
	// Forget generations of key pairs no longer in use.
	live := map[string]bool{}
	for _, s := range states {
		if s.Out {
			live[s.Pair] = true
		}
	}
	for p := range n.outGen {
		if !live[p] {
			delete(n.outGen, p)
		}
	}
	for p := range n.exhausted {
		if !live[p] {
			delete(n.exhausted, p)
		}
	}
	states = n.lingerLocked(states, have, now)
	addS, delS := diffStates(states, have)
	upP, delP := diffPolicies(policies, havePol)
	// Block and allow policies first (the cluster network is closed before
	// anything else changes), then new states, then the peer policies
	// (whose outbound templates name a state that now exists), then stale
	// policies and states. Until a peer's policy is in place its traffic
	// meets the block policy.
	for _, p := range upP {
		if !p.TmplSrc.IsValid() {
			if err := n.x.upsertPolicy(p); err != nil {
				n.addErr(failed, &rest, p.Peer, err)
			}
		}
	}
	// Delete replaced states (same id, other key) before adding them.
	for _, s := range delS {
		if slices.ContainsFunc(addS, func(a xstate) bool { return a.id() == s.id() }) {
			if err := n.x.delState(s); err != nil {
				rest = append(rest, err)
			}
		}
	}
	addFailed := map[stateID]bool{}
	for _, s := range addS {
		if err := n.x.addState(s); err != nil {
			addFailed[s.id()] = true
			n.addErr(failed, &rest, s.Peer, err)
		}
	}
	for _, p := range upP {
		if p.TmplSrc.IsValid() {
			if err := n.x.upsertPolicy(p); err != nil {
				n.addErr(failed, &rest, p.Peer, err)
			}
		}
	}
	outs := map[stateID]bool{}
	for _, s := range states {
		if s.Out && !addFailed[s.id()] {
			outs[s.id()] = true
		}
	}
	for id := range n.outSeen {
		if !outs[id] {
			delete(n.outSeen, id)
		}
	}
	for id := range outs {
		n.outSeen[id] = true
	}
	for _, p := range delP {
		if err := n.x.delPolicy(p); err != nil {
			rest = append(rest, err)
		}
	}
	for _, s := range delS {
		if !slices.ContainsFunc(addS, func(a xstate) bool { return a.id() == s.id() }) {
			if err := n.x.delState(s); err != nil {
				rest = append(rest, err)
			}
		}
	}
	if len(addS)+len(delS)+len(upP)+len(delP) > 0 {
		n.log.Info("xfrm reconciled", "states_added", len(addS), "states_deleted", len(delS),
			"policies_programmed", len(upP), "policies_deleted", len(delP))
	}
	if err := n.routes(ctx, in, failed); err != nil {
		rest = append(rest, err)
	}

	var errs []error
	for i := range in.peers {
		if err, ok := failed[i]; ok {
			errs = append(errs, &flannel.PeerError{Lease: n.peers[idx[i]], Err: err})
		}
	}
	return errors.Join(append(errs, rest...)...)
}

func (n *Network) addErr(failed map[int]error, rest *[]error, peer int, err error) {
	if peer < 0 {
		*rest = append(*rest, err)
		return
	}
	failed[peer] = errors.Join(failed[peer], err)
}

// reconcileRoutes routes every valid peer subnet via the next hop towards
// the peer's public address on the external interface (the address itself
// when on-link), so pod traffic reaches the xfrm output path whether or
// not the peer shares the L2 segment.
func (n *Network) reconcileRoutes(ctx context.Context, in input, failed map[int]error) error {
	var routes []netlink.Route
	for i, p := range in.peers {
		if !in.valid[i] {
			continue
		}
		for _, f := range families {
			sub, ip := f.subnet(p), f.ip(p)
			ownSub := f.subnet(in.own)
			if !sub.IsValid() || !ip.IsValid() || !ownSub.IsValid() || sub == ownSub {
				continue
			}
			gw, err := n.nextHop(ip)
			if err != nil {
				failed[i] = errors.Join(failed[i], err)
				continue
			}
			routes = append(routes, netlink.Route{
				LinkIndex: n.env.Iface.Index,
				Dst:       backend.IPNetFromPrefix(sub),
				Gw:        backend.IPFromAddr(gw),
			})
		}
	}
	if err := n.rec.Reconcile(ctx, n.env.Handle, n.env.Iface.Index, routes); err != nil {
		return fmt.Errorf("ipsec: routes: %w", err)
	}
	return nil
}

// nextHop returns the gateway the kernel uses towards ip on the external
// interface, or ip itself when it is on-link.
func (n *Network) nextHop(ip netip.Addr) (netip.Addr, error) {
	rs, err := n.env.Handle.RouteGet(backend.IPFromAddr(ip))
	if err != nil {
		return netip.Addr{}, fmt.Errorf("route to peer %s: %w", ip, err)
	}
	for _, r := range rs {
		if r.LinkIndex != n.env.Iface.Index {
			continue
		}
		if r.Gw != nil {
			return addrOf(r.Gw), nil
		}
		return ip, nil
	}
	return netip.Addr{}, fmt.Errorf("peer %s is not reached through %s", ip, n.env.Iface.Name)
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
	old := n.keys.cur
	n.keys.prev, n.keys.cur = &old, key
	n.rekeyedAt = n.now()
	clear(n.use)
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
		inGrace := n.keys.prev != nil || n.anyPeerPrevLocked()
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
	pending := n.keys.prev != nil
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

// lingerLocked adds to states the outbound states of ours in have that
// were replaced by another outbound state between the same addresses less
// than outLinger ago.
func (n *Network) lingerLocked(states, have []xstate, now time.Time) []xstate {
	type ends struct{ src, dst netip.Addr }
	want := make(map[stateID]bool, len(states))
	outTo := map[ends]bool{}
	for _, s := range states {
		want[s.id()] = true
		if s.Out {
			outTo[ends{s.Src, s.Dst}] = true
		}
	}
	keep := map[stateID]bool{}
	for _, h := range have {
		id := h.id()
		if want[id] || !n.outSeen[id] || !outTo[ends{h.Src, h.Dst}] {
			continue
		}
		until, ok := n.linger[id]
		if !ok {
			until = now.Add(outLinger)
			n.linger[id] = until
		}
		if now.Before(until) {
			h.Out, h.Peer = true, -1
			states = append(states, h)
			keep[id] = true
		}
	}
	for id := range n.linger {
		if !keep[id] {
			delete(n.linger, id)
		}
	}
	return states
}

// sendPrevLocked reports whether outbound to the peer with lease key key
// still uses our previous key. It switches to the current key as soon as
// the peer has sent with it (it has seen our new public key), or once
// Grace/2 has passed since the rekey and the peer has not sent with the
// previous key for Grace/2: a peer that keeps sending with the old key has
// not seen the new one (its store watch may be down), and one that sends
// nothing gives no sign either way.
func (n *Network) sendPrevLocked(key string, now time.Time) bool {
	if n.keys.prev == nil {
		return false
	}
	half := n.opts.Grace / 2
	u := n.use[key]
	if u == nil {
		return now.Sub(n.rekeyedAt) < half
	}
	return !u.knowsCur && (now.Sub(n.rekeyedAt) < half || now.Sub(u.prevUsedAt) < half)
}

// observeUseLocked reads the packet counters of our inbound states (have)
// into n.use and reports whether the outbound key of some peer in in
// changed as a result (in is updated).
func (n *Network) observeUseLocked(in input, idx []int, states, have []xstate, now time.Time) bool {
	packets := make(map[stateID]uint64, len(have))
	for _, s := range have {
		packets[s.id()] = s.Packets
	}
	type sums struct{ cur, prev uint64 }
	per := map[int]*sums{}
	for _, s := range states {
		if s.Out || s.Peer < 0 {
			continue
		}
		sm := per[s.Peer]
		if sm == nil {
			sm = &sums{}
			per[s.Peer] = sm
		}
		if s.ToPrev {
			sm.prev += packets[s.id()]
		} else {
			sm.cur += packets[s.id()]
		}
	}
	changed := false
	for i, sm := range per {
		key := n.peers[idx[i]].Key()
		u := n.use[key]
		if u == nil {
			// First look since the rekey: the baseline.
			u = &keyUse{prevPackets: sm.prev, prevUsedAt: n.rekeyedAt}
			n.use[key] = u
		}
		if sm.prev > u.prevPackets {
			u.prevUsedAt = now
		}
		u.prevPackets = sm.prev
		if sm.cur > 0 && !u.knowsCur {
			u.knowsCur = true
			n.log.Debug("peer sends with our new key", "subnet", n.peers[idx[i]].String())
		}
		if sp := n.sendPrevLocked(key, now); sp != in.peers[i].SendPrev {
			in.peers[i].SendPrev = sp
			changed = true
		}
	}
	return changed
}

// retirePrevLocked drops our previous key once Grace has passed since the
// rekey and no peer has sent with it for Grace/2 (or knows the current
// one), and after RekeyInterval in any case.
func (n *Network) retirePrevLocked(now time.Time) {
	if n.keys.prev == nil {
		return
	}
	elapsed := now.Sub(n.rekeyedAt)
	if elapsed < n.opts.Grace {
		return
	}
	var inUse []string
	for key, u := range n.use {
		if !u.knowsCur && now.Sub(u.prevUsedAt) < n.opts.Grace/2 {
			inUse = append(inUse, key)
		}
	}
	if len(inUse) > 0 && elapsed < n.opts.RekeyInterval {
		return
	}
	if len(inUse) > 0 {
		slices.Sort(inUse)
		n.log.Warn("retiring the previous key although peers still send with it; they have not seen the new key for a whole rekey interval", "peers", inUse)
	}
	n.keys.prev = nil
	clear(n.use)
}

func (n *Network) anyPeerPrevLocked() bool {
	for _, pk := range n.peerKeys {
		if pk.prev != nil {
			return true
		}
	}
	return false
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
	v4, v6 := n.ownIPs()
	in := input{
		psk: n.opts.PSK, cipher: n.opts.Cipher,
		cluster: n.env.Config.Network, cluster6: n.env.Config.IPv6Network,
		own:  nodeView{Subnet: n.own.Subnet, Subnet6: n.own.IPv6Subnet, IP: v4, IP6: v6},
		keys: n.keys,
	}
	if !in.cluster.IsValid() && n.own.Subnet.IsValid() {
		in.cluster = n.own.Subnet
	}
	_, policies, _ := desired(in)
	var errs []error
	for _, p := range policies {
		errs = append(errs, n.x.upsertPolicy(p))
	}
	return errors.Join(errs...)
}
