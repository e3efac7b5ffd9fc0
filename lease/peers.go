package lease

import (
	"cmp"
	"fmt"
	"net/netip"
	"slices"
)

// Rule names why a lease in a store is not a valid peer. Stores use the
// value in their warnings.
type Rule string

// The rules a lease breaks when Peers ignores it. RuleMalformed is for
// stores: data that does not even parse into a lease.
const (
	RuleMalformed Rule = "malformed"
	RuleOutside   Rule = "outside the network"
	RuleLength    Rule = "prefix length is not the subnet length"
	RuleOverlap   Rule = "overlaps another lease"
	RuleOwnSubnet Rule = "claims this node's subnet from another node"
)

// Candidate is one lease as a store holds it, before Peers judges it.
type Candidate struct {
	// Name names the object in warnings: the etcd key, the Node name.
	Name  string
	Lease Lease
	// Order decides between overlapping leases: the lowest wins (etcd's
	// create revision, the Node's creation time, memstore's insertion
	// sequence: the older lease). Equal lowest orders: all are ignored.
	Order int64
	// Own marks a lease this node published (same identity, or for
	// Kubernetes its own Node).
	Own bool
	// fed: Feed delivered this candidate's lease (see Feed).
	fed bool
}

// Ignored is a candidate that is not a valid peer, with the rule it breaks.
type Ignored struct {
	Candidate
	Rule Rule
	// Detail says what exactly is wrong, for the warning.
	Detail string
}

// Verdict is what Peers decided about a store's leases.
type Verdict struct {
	// Valid are the valid peers (this node's own lease included), in the
	// order of the candidates.
	Valid []Candidate
	// Ignored are the others, in the order of the candidates.
	Ignored []Ignored
}

// Leases returns the valid leases: what a store hands to Watch's fn.
func (v Verdict) Leases() []Lease {
	out := make([]Lease, len(v.Valid))
	for i, c := range v.Valid {
		out[i] = c.Lease
	}
	return out
}

// Taken returns what allocation must count as held: the valid leases and
// those ignored only because they overlap another (their subnets have the
// right shape and the store really holds them, so creating them again
// would fail). Leases outside the network or of another length are not
// counted, so hostile keys such as 0.0.0.0/1 cannot exhaust the network.
func (v Verdict) Taken() []Lease {
	return Taken(v.Leases(), v.Ignored)
}

// Taken is Verdict.Taken for PeerLeases' results: valid with the subnets
// of the ignored leases that allocation must still count appended (valid's
// array is reused, so the caller gives it up).
func Taken(valid []Lease, ignored []Ignored) []Lease {
	for _, ig := range ignored {
		if ig.Rule == RuleOverlap || ig.Rule == RuleOwnSubnet {
			valid = append(valid, ig.Lease)
		}
	}
	return valid
}

// Shape checks the rules of one lease on its own: every subnet it has is
// of an enabled family, inside Network (IPv6Network) and of length
// SubnetLen (IPv6SubnetLen), and it has at least one. It returns "" when
// the lease fits, else the rule broken and a detail. A lease without a
// subnet of one enabled family is allowed (a node not yet dual-stack).
// It does not check SubnetMin/SubnetMax: reservations may lie outside.
func (c Config) Shape(l Lease) (Rule, string) {
	if !l.Subnet.IsValid() && !l.IPv6Subnet.IsValid() {
		return RuleOutside, "no subnet"
	}
	if r, d := shapeFamily(c.EnableIPv4, "Network", c.Network, c.SubnetLen, l.Subnet); r != "" {
		return r, d
	}
	return shapeFamily(c.EnableIPv6, "IPv6Network", c.IPv6Network, c.IPv6SubnetLen, l.IPv6Subnet)
}

func shapeFamily(enabled bool, key string, network netip.Prefix, subLen int, p netip.Prefix) (Rule, string) {
	switch {
	case !p.IsValid():
		return "", ""
	case !enabled:
		return RuleOutside, fmt.Sprintf("subnet %s but the network has no %s", p, key)
	case p.Bits() < network.Bits() || !network.Contains(p.Addr()) || p.Masked() != p:
		return RuleOutside, fmt.Sprintf("subnet %s is not inside %s %s", p, key, network)
	case p.Bits() != subLen:
		return RuleLength, fmt.Sprintf("subnet %s is not a /%d", p, subLen)
	}
	return "", ""
}

// Peers applies the one rule for valid peers that every store follows: a
// lease is ignored (for allocation, see Verdict.Taken, and for Watch's
// snapshots) when
//
//   - its subnet is not inside Network (IPv6Network), or it has a subnet
//     of a disabled family (RuleOutside);
//   - its prefix length is not SubnetLen (IPv6SubnetLen) (RuleLength);
//   - it is not this node's (Own false) and overlaps own or a lease of
//     this node's (RuleOwnSubnet): this node's subnet is never routed away;
//   - it overlaps another lease (RuleOverlap). Of overlapping leases the
//     one with the lowest Order (the older) stays valid; when the lowest
//     Order is shared, all of them are ignored. Leases that passed the
//     first two rules overlap only when they hold the same subnet.
//
// own is this node's lease when the store knows it (zero otherwise); its
// subnets count as this node's as well as those of Own candidates. Peers
// is pure and keeps no state; see Warnings for logging once.
func (c Config) Peers(cands []Candidate, own Lease) Verdict {
	valid, ignored := sortOut(cands, c.marks(cands, own), func(cd Candidate) Candidate { return cd })
	return Verdict{Valid: valid, Ignored: ignored}
}

// PeerLeases is Peers(cands, own).Leases() with the ignored candidates,
// without the copy of every valid candidate: what a store's Watch needs
// on every change. The leases are in the candidates' order but for own's
// (same subnets), which comes first: a consumer that leaves it out (the
// Agent) takes the rest as it is instead of copying it. Feed does the
// same for a store that keeps its candidates, without a copy per change.
func (c Config) PeerLeases(cands []Candidate, own Lease) (leases []Lease, ignored []Ignored) {
	leases, ignored = sortOut(cands, c.marks(cands, own), func(cd Candidate) Lease { return cd.Lease })
	if !own.Subnet.IsValid() && !own.IPv6Subnet.IsValid() {
		return leases, ignored
	}
	if i := slices.IndexFunc(leases, own.SameSubnets); i > 0 {
		l := leases[i]
		copy(leases[1:i+1], leases[:i])
		leases[0] = l
	}
	return leases, ignored
}

// sortOut splits cands by their marks: keep(cd) of each valid one, and the
// ignored ones with their rule, both in the candidates' order.
func sortOut[T any](cands []Candidate, bad []mark, keep func(Candidate) T) (valid []T, ignored []Ignored) {
	n := 0
	for _, b := range bad {
		if b.rule == "" {
			n++
		}
	}
	valid = make([]T, 0, n)
	for i, b := range bad {
		if b.rule == "" {
			valid = append(valid, keep(cands[i]))
		} else {
			ignored = append(ignored, Ignored{Candidate: cands[i], Rule: b.rule, Detail: b.detail})
		}
	}
	return valid, ignored
}

// marks is Peers' verdict on each candidate, in their order.
func (c Config) marks(cands []Candidate, own Lease) []mark {
	return c.marksInto(&verdictBufs{}, cands, own)
}

// verdictBufs are the arrays a verdict needs, which a Feed keeps from one
// call to the next: the marks and the bitmaps of distinct.
type verdictBufs struct {
	marks  []mark
	v4, v6 []uint64
}

// marksInto is marks in b's arrays (grown when too small); the marks stay
// in b.marks until the next call.
func (c Config) marksInto(b *verdictBufs, cands []Candidate, own Lease) []mark {
	if cap(b.marks) < len(cands) {
		b.marks = make([]mark, len(cands))
	}
	bad := b.marks[:len(cands)] // rule "" means valid
	clear(bad)
	// This node's subnets: a few, so a slice (no hashing per lease).
	var ownSubnets []netip.Prefix
	for _, p := range []netip.Prefix{own.Subnet, own.IPv6Subnet} {
		if p.IsValid() {
			ownSubnets = append(ownSubnets, p)
		}
	}
	for i, cd := range cands {
		if r, d := c.Shape(cd.Lease); r != "" {
			bad[i] = mark{r, d}
			continue
		}
		if cd.Own {
			for _, p := range [2]netip.Prefix{cd.Lease.Subnet, cd.Lease.IPv6Subnet} {
				if p.IsValid() && !slices.Contains(ownSubnets, p) {
					ownSubnets = append(ownSubnets, p)
				}
			}
		}
	}
	var shared map[netip.Prefix][]int
	if !c.distinct(cands, bad, b) {
		shared = sharedSubnets(cands, bad)
	}
	for i, cd := range cands {
		if bad[i].rule != "" || cd.Own {
			continue
		}
		for _, p := range [2]netip.Prefix{cd.Lease.Subnet, cd.Lease.IPv6Subnet} {
			if p.IsValid() && slices.Contains(ownSubnets, p) {
				bad[i] = mark{RuleOwnSubnet, fmt.Sprintf("subnet %s is this node's", p)}
			}
		}
	}
	for p, idx := range shared {
		resolveOverlap(cands, bad, p, idx)
	}
	return bad
}

// sharedSubnets returns the holders, in order, of each subnet held by more
// than one of the candidates that fit (bad[i] empty).
func sharedSubnets(cands []Candidate, bad []mark) map[netip.Prefix][]int {
	// The first holder of each subnet; only subnets held more than once
	// get a list.
	first := make(map[netip.Prefix]int, len(cands))
	var shared map[netip.Prefix][]int
	for i, cd := range cands {
		if bad[i].rule != "" {
			continue
		}
		for _, p := range [2]netip.Prefix{cd.Lease.Subnet, cd.Lease.IPv6Subnet} {
			if !p.IsValid() {
				continue
			}
			j, ok := first[p]
			if !ok {
				first[p] = i
				continue
			}
			if shared == nil {
				shared = map[netip.Prefix][]int{}
			}
			if _, ok := shared[p]; !ok {
				shared[p] = []int{j}
			}
			shared[p] = append(shared[p], i)
		}
	}
	return shared
}

// maxDenseBits bounds the bitmap distinct uses per family: a network of
// at most 2^maxDenseBits subnets (a /16 of /24s has 256, a /8 of /24s
// 65,536) is checked with a bitmap of 1 bit per subnet.
const maxDenseBits = 18

// distinct reports whether no two candidates that fit (bad[i] empty) hold
// the same subnet, when it can tell cheaply: with one bit per possible
// subnet of each family, and no hashing. It reports false on the first
// subnet held twice, or when a family's network has too many subnets for a
// bitmap; the caller then looks at the subnets one by one.
func (c Config) distinct(cands []Candidate, bad []mark, b *verdictBufs) bool {
	var v4, v6 bitmap
	if c.EnableIPv4 && !v4.reset(c.Network, c.SubnetLen, &b.v4) {
		return false
	}
	if c.EnableIPv6 && !v6.reset(c.IPv6Network, c.IPv6SubnetLen, &b.v6) {
		return false
	}
	for i, cd := range cands {
		if bad[i].rule != "" {
			continue
		}
		// Shape passed: each valid subnet is of an enabled family, inside
		// its network and of its subnet length.
		if p := cd.Lease.Subnet; p.IsValid() && !v4.claim(p) {
			return false
		}
		if p := cd.Lease.IPv6Subnet; p.IsValid() && !v6.claim(p) {
			return false
		}
	}
	return true
}

// bitmap has a bit per subnet of its space, numbered as the allocator
// numbers them.
type bitmap struct {
	sp   space
	bits []uint64
}

// reset makes b a clear bitmap of the subnets of length subLen in
// network, in *words' array (grown when too small), and reports false
// when there are more than 2^maxDenseBits.
func (b *bitmap) reset(network netip.Prefix, subLen int, words *[]uint64) bool {
	width := subLen - network.Bits()
	if !network.IsValid() || width < 0 || width > maxDenseBits {
		return false
	}
	n := (1<<width + 63) / 64
	if cap(*words) < n {
		*words = make([]uint64, n)
	}
	b.sp = newSpace("", network, subLen, network.Addr(), network.Addr())
	b.bits = (*words)[:n]
	clear(b.bits)
	return true
}

// claim sets subnet p's bit and reports whether it was clear.
func (b *bitmap) claim(p netip.Prefix) bool {
	i := b.sp.index(p.Addr())
	w, m := i/64, uint64(1)<<(i%64)
	if b.bits[w]&m != 0 {
		return false
	}
	b.bits[w] |= m
	return true
}

// mark is Peers' verdict on one candidate: the rule it breaks, "" if none.
type mark struct {
	rule   Rule
	detail string
}

// resolveOverlap marks all but the lowest-Order holder of p (all of them
// on a tie) as overlapping, among those not already ignored.
func resolveOverlap(cands []Candidate, bad []mark, p netip.Prefix, idx []int) {
	idx = slices.DeleteFunc(slices.Clone(idx), func(i int) bool {
		return bad[i].rule != "" && bad[i].rule != RuleOverlap
	})
	if len(idx) < 2 {
		return
	}
	slices.SortStableFunc(idx, func(a, b int) int { return cmp.Compare(cands[a].Order, cands[b].Order) })
	winner := -1
	if cands[idx[0]].Order != cands[idx[1]].Order {
		winner = idx[0]
	}
	for _, i := range idx {
		if i == winner || bad[i].rule != "" {
			continue
		}
		var detail string
		switch {
		case winner >= 0:
			detail = fmt.Sprintf("subnet %s is held by the older %s", p, cands[winner].Name)
		case i == idx[0]:
			detail = fmt.Sprintf("subnet %s is also claimed by %s, as old", p, cands[idx[1]].Name)
		default:
			detail = fmt.Sprintf("subnet %s is also claimed by %s, as old", p, cands[idx[0]].Name)
		}
		bad[i] = mark{RuleOverlap, detail}
	}
}
