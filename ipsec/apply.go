package ipsec

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"time"

	"github.com/vishvananda/netlink"

	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/lease"
)

// applyPass is one apply's view of the peers: the input of desired, the
// leases behind its peers and what failed so far.
type applyPass struct {
	in     input
	leases []lease.Lease // in.peers[i] is leases[i]
	failed map[int]error // by index into in.peers
	rest   []error       // failures of no peer
}

// addErr records err for peer, or as nobody's when peer is -1.
func (r *applyPass) addErr(peer int, err error) {
	if peer < 0 {
		r.rest = append(r.rest, err)
		return
	}
	r.failed[peer] = errors.Join(r.failed[peer], err)
}

// err is the result of the apply: a *flannel.PeerError per failed peer,
// in peer order, then the rest.
func (r *applyPass) err() error {
	var pe backend.PeerErrs
	for i := range r.in.peers {
		if err, ok := r.failed[i]; ok {
			pe.Add(i, err)
		}
	}
	return errors.Join(append(pe.Errors(r.leases), r.rest...)...)
}

// applyLocked makes the kernel match peers: the XFRM states and policies
// (asking the key book what to install, planning the writes and executing
// them), then the routes. It is the Reconciler's Apply and runs with its
// lock held.
func (n *Network) applyLocked(ctx context.Context, peers []lease.Lease) error {
	r, err := n.reconcileXfrm(peers)
	if err != nil {
		return err
	}
	if err := n.routes(ctx, r.in, r.failed); err != nil {
		r.rest = append(r.rest, err)
	}
	return r.err()
}

// reconcileXfrm brings our XFRM states and policies to what peers and
// the key book want. An error is returned only when the kernel's tables
// cannot be read; failed writes are in the applyPass.
func (n *Network) reconcileXfrm(peers []lease.Lease) (*applyPass, error) {
	now := n.now()
	n.book.retirePrev(now)
	r := n.peerInput(peers, now)
	have, err := n.x.states()
	if err != nil {
		return nil, fmt.Errorf("ipsec: %w", err)
	}
	havePol, err := n.x.policies()
	if err != nil {
		return nil, fmt.Errorf("ipsec: %w", err)
	}
	states, policies := n.want(r, have, now)
	steps := plan(states, policies, have, havePol)
	addFailed := map[stateID]bool{}
	execute(n.x, steps, func(s step, err error) {
		if s.kind == stepAddState {
			addFailed[s.state.id()] = true
		}
		r.addErr(s.peer(), err)
	})
	n.book.installed(states, addFailed)
	if len(steps) > 0 {
		c := stepCounts(steps)
		n.log.Info("xfrm reconciled", "states_added", c[stepAddState], "states_deleted", c[stepDelState],
			"policies_programmed", c[stepUpsertPolicy], "policies_deleted", c[stepDelPolicy])
	}
	return r, nil
}

// want returns the states and policies to install: desired for r.in once
// the key book has seen the peers' traffic in have (which may switch
// outbound keys) and the outbound states that vanished (which move to
// their next generation); then without the outbound states of exhausted
// key pairs, and with those lingering after a switch. Peers that cannot be
// programmed get their error in r.failed.
func (n *Network) want(r *applyPass, have []xstate, now time.Time) ([]xstate, []xpolicy) {
	r.in.outGen = n.book.outGen
	states, policies, failed := desired(r.in)
	if n.book.pending() && n.book.observe(r.in, r.leases, states, have, now) {
		states, policies, failed = desired(r.in)
	}
	if n.book.vanished(states, have) {
		states, policies, failed = desired(r.in)
	}
	for i, err := range failed {
		if _, ok := r.failed[i]; !ok {
			r.failed[i] = err
		}
	}
	n.book.checkLimits(states, have)
	states = n.book.dropExhausted(states, r.failed)
	n.book.forgetPairs(states)
	return n.book.lingerStates(states, have, now), policies
}

// baseInput is the input of desired without peers.
func (n *Network) baseInput() input {
	v4, v6 := n.ownIPs()
	in := input{
		psk:      n.opts.PSK,
		cipher:   n.opts.Cipher,
		encap:    n.opts.UDPEncap,
		cluster:  n.env.Config.Network,
		cluster6: n.env.Config.IPv6Network,
		own:      nodeView{Subnet: n.own.Subnet, Subnet6: n.own.IPv6Subnet, IP: v4, IP6: v6},
		keys:     n.book.keys,
	}
	if !in.cluster.IsValid() && n.own.Subnet.IsValid() {
		in.cluster = n.own.Subnet // a hand-built Config: block at least the own subnet's peers
	}
	return in
}

// peerInput builds the input for peers: peers of other backend types
// and the own lease are skipped; a peer whose key is unusable (see
// peerKeys) is in it (as not valid) with its error, warned about once per
// BackendData.
func (n *Network) peerInput(peers []lease.Lease, now time.Time) *applyPass {
	r := &applyPass{in: n.baseInput(), failed: map[int]error{}}
	var ls []lease.Lease
	for _, p := range peers {
		if p.Attrs.BackendType != Type {
			n.log.Debug("skipping peer of another backend", "subnet", p.String(), "backend_type", p.Attrs.BackendType)
			continue
		}
		if !p.SameSubnets(n.own) {
			ls = append(ls, p)
		}
	}
	keys, errs := n.peerKeys(ls)
	usable := map[string]bool{}
	present := map[string]bool{}
	for i, p := range ls {
		key := p.Key()
		present[key] = true
		v := nodeView{Subnet: p.Subnet, Subnet6: p.IPv6Subnet, IP: p.Attrs.PublicIP, IP6: p.Attrs.PublicIPv6}
		if err := errs[i]; err != nil {
			r.failed[len(r.in.peers)] = err
			if n.book.unusable(key, p.Attrs.BackendData, err) {
				n.log.Warn("peer not programmed: its key is unusable; traffic to it stays blocked",
					"subnet", p.String(), "public_ip", p.Attrs.PublicIP, "err", err)
			}
		} else {
			usable[key] = true
			v.Cur, v.Prev = n.book.peer(key, p.String(), keys[i].pub, now)
			v.SendPrev = n.book.sendPrev(key, now)
		}
		r.in.peers = append(r.in.peers, v)
		r.in.valid = append(r.in.valid, errs[i] == nil)
		r.leases = append(r.leases, p)
	}
	n.book.forgetPeers(usable, present)
	return r
}

// ErrDuplicateKey is wrapped by the error for a peer whose public key is
// also published by another peer or is this node's own.
var ErrDuplicateKey = errors.New("peer publishes a public key that another node uses too")

// peerKeys reads the keys of peers: errs[i] is set for a peer whose key is
// missing, malformed or not authenticated for its lease (ErrPeerAuth),
// whose epoch is older than one seen before for its subnets (ErrOldEpoch),
// or whose key another peer or this node uses (ErrDuplicateKey).
func (n *Network) peerKeys(peers []lease.Lease) ([]publishedKey, []error) {
	keys := make([]publishedKey, len(peers))
	errs := make([]error, len(peers))
	users := map[string]int{string(n.book.keys.cur.pub): 2}
	if n.book.keys.prev != nil {
		users[string(n.book.keys.prev.pub)] = 2
	}
	for i, p := range peers {
		keys[i], errs[i] = parsePeerKey(n.opts.PSK, p)
		if errs[i] == nil {
			errs[i] = n.book.checkEpoch(p.Key(), keys[i])
		}
		if errs[i] == nil {
			users[string(keys[i].pub)]++
		}
	}
	for i := range peers {
		if errs[i] == nil && users[string(keys[i].pub)] > 1 {
			errs[i] = ErrDuplicateKey
		}
	}
	return keys, errs
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
				Dst:       ipconv.IPNetFromPrefix(sub),
				Gw:        ipconv.IPFromAddr(gw),
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
	rs, err := n.env.Handle.RouteGet(ipconv.IPFromAddr(ip))
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
