package ipsec

import (
	"bytes"
	"fmt"
	"net/netip"
	"slices"
)

// Policy directions and actions, as in the kernel (XFRM_POLICY_IN/OUT/FWD,
// XFRM_POLICY_ALLOW/BLOCK).
type dir uint8

const (
	dirIn  dir = 0
	dirOut dir = 1
	dirFwd dir = 2
)

const (
	// Priorities of our policies (lower wins). The allow and block ones
	// have no template and are recognised as ours by these values.
	prioAllow = 0x66c0
	prioPeer  = 0x66c1
	prioBlock = 0x66cf
)

// xstate is a desired or actual ESP tunnel-mode state. Key holds secret
// material: never print an xstate.
type xstate struct {
	Src, Dst netip.Addr
	SPI      uint32
	Key      []byte
	Encap    bool
	Out      bool   // outbound (informational; not compared)
	Peer     int    // index into the peers of the input, -1 if none
	Pair     string // outbound: pairName of its keys
	Gen      uint8  // outbound: the generation of its key and SPI
	ToPrev   bool   // inbound: received with our previous key (informational)
	Packets  uint64 // actual: packets the kernel counted (informational)
	Bytes    uint64 // actual: bytes the kernel counted (informational)
}

// Generations is how many generations of a sender's outbound state each
// receiver keeps inbound states for: an outbound state deleted by hand is
// replaced by the next generation (a new SPI and key, never the old key
// with a restarted sequence number) up to Generations-1 times per key
// lifetime; after that the peer stays blocked until the next rekey or
// restart.
const Generations = 4

// pairName names a (sender, receiver) key pair.
func pairName(sender, receiver []byte) string { return string(sender) + string(receiver) }

type stateID struct {
	src, dst netip.Addr
	spi      uint32
}

func (s xstate) id() stateID { return stateID{s.Src, s.Dst, s.SPI} }

// xpolicy is a desired or actual policy. A valid TmplSrc means an ESP
// tunnel template between TmplSrc and TmplDst; otherwise Block decides.
// An outbound template names the SPI of the one state to use (TmplSPI), so
// a key switch is a policy update: every flow moves to the new state at
// once, while packets already on their way through the old one, which
// lingers briefly, still leave.
type xpolicy struct {
	Src, Dst         netip.Prefix
	Dir              dir
	Priority         int
	Block            bool
	TmplSrc, TmplDst netip.Addr
	TmplSPI          uint32 // 0: any
	Peer             int
}

type policyID struct {
	src, dst netip.Prefix
	dir      dir
}

func (p xpolicy) id() policyID { return policyID{p.Src, p.Dst, p.Dir} }

func (p xpolicy) String() string {
	s := fmt.Sprintf("%s->%s dir %d prio %#x", p.Src, p.Dst, p.Dir, p.Priority)
	if p.TmplSrc.IsValid() {
		s += fmt.Sprintf(" esp tunnel %s->%s", p.TmplSrc, p.TmplDst)
		if p.TmplSPI != 0 {
			s += fmt.Sprintf(" spi %#x", p.TmplSPI)
		}
		return s
	}
	if p.Block {
		return s + " block"
	}
	return s + " allow"
}

// nodeView is what the desired-state computation knows about a node: its
// subnets, public addresses and public keys (prev is a key replaced within
// the grace period, nil when none). For a peer, SendPrev says that our
// outbound to it still uses our previous key (it may not have seen the
// current one yet).
type nodeView struct {
	Subnet, Subnet6 netip.Prefix
	IP, IP6         netip.Addr
	Cur, Prev       []byte
	SendPrev        bool
}

// localKeys are this node's key pairs: cur is published; prev was replaced
// by a rekey and is still accepted (and sent with to peers that have not
// shown they know cur).
type localKeys struct {
	cur  keyPair
	prev *keyPair
}

// input is everything desired needs.
type input struct {
	psk      []byte
	cipher   Cipher
	encap    bool
	cluster  netip.Prefix // IPv4 cluster network; invalid when off
	cluster6 netip.Prefix
	own      nodeView
	keys     localKeys
	peers    []nodeView
	valid    []bool           // peers[i] has a usable key (checked by the caller)
	outGen   map[string]uint8 // generation of our outbound state per pairName
}

// family selects the IPv4 or IPv6 fields of a nodeView.
type family struct {
	subnet  func(nodeView) netip.Prefix
	ip      func(nodeView) netip.Addr
	cluster func(input) netip.Prefix
	name    string
}

var families = [...]family{
	{func(n nodeView) netip.Prefix { return n.Subnet }, func(n nodeView) netip.Addr { return n.IP }, func(i input) netip.Prefix { return i.cluster }, "IPv4"},
	{func(n nodeView) netip.Prefix { return n.Subnet6 }, func(n nodeView) netip.Addr { return n.IP6 }, func(i input) netip.Prefix { return i.cluster6 }, "IPv6"},
}

// desired computes the states and policies for in. Peers that cannot be
// programmed get an error in failed (by peer index).
func desired(in input) (states []xstate, policies []xpolicy, failed map[int]error) {
	failed = map[int]error{}
	fail := func(i int, err error) {
		if _, ok := failed[i]; !ok {
			failed[i] = err
		}
	}
	sp := newSPIs(in)
	for _, f := range families {
		ownSub, ownIP, cluster := f.subnet(in.own), f.ip(in.own), f.cluster(in)
		if !ownSub.IsValid() || !cluster.IsValid() {
			continue
		}
		policies = append(policies, closedPolicies(ownSub, cluster)...)
		if !ownIP.IsValid() {
			continue
		}
		for i, p := range in.peers {
			sub, ip := f.subnet(p), f.ip(p)
			if !sub.IsValid() {
				continue
			}
			if sub == ownSub {
				continue
			}
			if !ip.IsValid() {
				fail(i, fmt.Errorf("no public %s address for subnet %s", f.name, sub))
				continue
			}
			if !in.valid[i] {
				continue
			}
			st, pol, errs := peerESP(in, sp, i, tunnel{ownSub: ownSub, ownIP: ownIP, sub: sub, ip: ip})
			for _, err := range errs {
				fail(i, err)
			}
			states = append(states, st...)
			policies = append(policies, pol...)
		}
	}
	// Duplicate state ids (an SPI collision among grace pairs) and policy
	// ids (peers sharing a public address) keep the first.
	seen := map[stateID]bool{}
	states = slices.DeleteFunc(states, func(s xstate) bool {
		if seen[s.id()] {
			return true
		}
		seen[s.id()] = true
		return false
	})
	seenPol := map[policyID]bool{}
	policies = slices.DeleteFunc(policies, func(p xpolicy) bool {
		if seenPol[p.id()] {
			return true
		}
		seenPol[p.id()] = true
		return false
	})
	return states, policies, failed
}

// closedPolicies are the policies of one family that do not depend on
// peers, under the per-peer ones: anything to the own subnet stays local
// (out) and the own subnet reaches itself (in, fwd); traffic to the rest
// of the cluster network from any source (pods, the host, SNAT) leaves
// only through a peer policy, and traffic from the cluster network to the
// own subnet is accepted only through one (decapsulated from its ESP
// state), so cleartext with a cluster source never reaches a local pod.
func closedPolicies(ownSub, cluster netip.Prefix) []xpolicy {
	anySrc := netip.PrefixFrom(netip.IPv4Unspecified(), 0)
	if ownSub.Addr().Is6() {
		anySrc = netip.PrefixFrom(netip.IPv6Unspecified(), 0)
	}
	return []xpolicy{
		{Src: anySrc, Dst: ownSub, Dir: dirOut, Priority: prioAllow, Peer: -1},
		{Src: anySrc, Dst: cluster, Dir: dirOut, Priority: prioBlock, Block: true, Peer: -1},
		{Src: ownSub, Dst: ownSub, Dir: dirIn, Priority: prioAllow, Peer: -1},
		{Src: cluster, Dst: ownSub, Dir: dirIn, Priority: prioBlock, Block: true, Peer: -1},
		{Src: ownSub, Dst: ownSub, Dir: dirFwd, Priority: prioAllow, Peer: -1},
		{Src: cluster, Dst: ownSub, Dir: dirFwd, Priority: prioBlock, Block: true, Peer: -1},
	}
}

// tunnel is one family's ends of the tunnel to a peer: the own and the
// peer's subnet and public address.
type tunnel struct {
	ownSub, sub netip.Prefix
	ownIP, ip   netip.Addr
}

// peerESP returns the states and policies for peer i of in over t: our
// outbound state (our key the peer knows, its current key) and the
// policies, with an inbound state for every live sender key of the peer
// to every live key of ours and every generation. A failed outbound key
// gives nothing; a failed inbound key leaves that state out. The errors
// are in order.
func peerESP(in input, sp *spis, i int, t tunnel) ([]xstate, []xpolicy, []error) {
	p := in.peers[i]
	outKey := in.keys.cur
	if p.SendPrev && in.keys.prev != nil {
		outKey = *in.keys.prev
	}
	table, used := sp.to(p.Cur)
	pair := pairName(outKey.pub, p.Cur)
	gen := in.outGen[pair]
	v6 := t.ownIP.Is6()
	k, err := deriveKey(in.psk, in.cipher, outKey.priv, p.Cur, outKey.pub, p.Cur, gen, v6)
	if err != nil {
		return nil, nil, []error{err}
	}
	outSPI := spiFor(outKey.pub, p.Cur, gen, table, used)
	states := []xstate{{Src: t.ownIP, Dst: t.ip, SPI: outSPI, Key: k, Encap: in.encap, Out: true, Peer: i, Pair: pair, Gen: gen}}
	senders := [][]byte{p.Cur}
	if p.Prev != nil {
		senders = append(senders, p.Prev)
	}
	recvs := []receiver{{in.keys.cur, sp.inTable, sp.inUsed, false}}
	if in.keys.prev != nil {
		recvs = append(recvs, receiver{*in.keys.prev, sp.prevTable, sp.prevUsed, true})
	}
	var errs []error
	for _, r := range recvs {
		for _, s := range senders {
			for gen := range uint8(Generations) {
				k, err := deriveKey(in.psk, in.cipher, r.kp.priv, s, s, r.kp.pub, gen, v6)
				if err != nil {
					errs = append(errs, err)
					continue
				}
				states = append(states, xstate{Src: t.ip, Dst: t.ownIP, SPI: spiFor(s, r.kp.pub, gen, r.table, r.used), Key: k, Encap: in.encap, Peer: i, ToPrev: r.prev})
			}
		}
	}
	return states, tunnelPolicies(t, outSPI, i), errs
}

// tunnelPolicies are the policies of the tunnel t to peer i: out, in and
// fwd between the pod subnets, and the same between our public address
// and the peer's subnet (host and SNAT sources: kube-proxy masquerades
// NodePort traffic to a remote pod to it) and the peer's public address
// and ours. outSPI pins our outbound state.
func tunnelPolicies(t tunnel, outSPI uint32, i int) []xpolicy {
	out := xpolicy{Src: t.ownSub, Dst: t.sub, Dir: dirOut, Priority: prioPeer, TmplSrc: t.ownIP, TmplDst: t.ip, TmplSPI: outSPI, Peer: i}
	in := xpolicy{Src: t.sub, Dst: t.ownSub, Dir: dirIn, Priority: prioPeer, TmplSrc: t.ip, TmplDst: t.ownIP, Peer: i}
	fwd := in
	fwd.Dir = dirFwd
	hostOut, hostIn, hostFwd := out, in, fwd
	hostOut.Src = netip.PrefixFrom(t.ownIP, t.ownIP.BitLen())
	hostIn.Src = netip.PrefixFrom(t.ip, t.ip.BitLen())
	hostFwd.Src = hostIn.Src
	return []xpolicy{out, in, fwd, hostOut, hostIn, hostFwd}
}

// receiver is a key pair of ours that peers send to, with the SPIs of the
// senders to it.
type receiver struct {
	kp    keyPair
	table spiTable
	used  map[uint32]bool
	prev  bool // our previous key
}

type spiTable map[keyPairID]uint32

// spis are the SPI assignments of an input: by the current (published)
// keys of every node, the own node first, to our current and previous
// key.
type spis struct {
	curKeys            [][]byte
	inTable, prevTable spiTable
	inUsed, prevUsed   map[uint32]bool
}

func newSPIs(in input) *spis {
	sp := &spis{curKeys: [][]byte{in.keys.cur.pub}}
	for i, p := range in.peers {
		if in.valid[i] {
			sp.curKeys = append(sp.curKeys, p.Cur)
		}
	}
	sp.inTable, sp.inUsed = sp.to(in.keys.cur.pub)
	if in.keys.prev != nil {
		sp.prevTable, sp.prevUsed = sp.to(in.keys.prev.pub)
	}
	return sp
}

// to assigns the SPIs of the current keys of the other nodes to receiver.
func (sp *spis) to(receiver []byte) (spiTable, map[uint32]bool) {
	var pairs []keyPairID
	for _, k := range sp.curKeys {
		if !bytes.Equal(k, receiver) {
			pairs = append(pairs, keyPairID{string(k), string(receiver)})
		}
	}
	used := map[uint32]bool{}
	return assignSPIs(pairs, used), used
}

// spiFor is the SPI of sender's gen-th generation to receiver: its
// assignment in table, or for a pair outside the current set (a grace
// key) the first candidate not taken by the current set at that receiver.
func spiFor(sender, receiver []byte, gen uint8, table spiTable, used map[uint32]bool) uint32 {
	id := keyPairID{string(sender), string(receiver)}
	if gen > 0 {
		id.receiver += fmt.Sprintf("\x00gen%d", gen)
	}
	if s, ok := table[id]; ok {
		return s
	}
	for try := uint32(0); ; try++ {
		if s := spiCandidate([]byte(id.sender), []byte(id.receiver), try); !used[s] {
			return s
		}
	}
}

// MTU returns the largest inner packet that fits in an ESP tunnel-mode
// packet of at most linkMTU bytes with cipher c: outer IP header, ESP
// header (SPI, sequence number), 8-byte IV, payload plus 2 trailer bytes
// padded to 4 bytes, ICV; plus 8 bytes of UDP header with encap.
func MTU(linkMTU int, ipv6, encap bool, c Cipher) int {
	outer := 20
	if ipv6 {
		outer = 40
	}
	if encap {
		outer += 8
	}
	room := linkMTU - outer - 8 - 8 - c.ICVBits()/8
	room -= room % 4
	return room - 2
}
