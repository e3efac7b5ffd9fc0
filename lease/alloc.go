package lease

import (
	"cmp"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
)

// Allocate picks a lease for a node given the leases other nodes hold
// (taken). It returns a Lease with Subnet and/or IPv6Subnet set for the
// enabled families and nothing else (no attributes, no expiration).
//
// For each enabled family, previous's subnet is kept when it is valid for c
// (CheckLease's rules for that family) and free; otherwise a subnet is drawn
// uniformly at random among the free subnets in [SubnetMin, SubnetMax].
// A subnet is free when no prefix in taken overlaps it: taken prefixes of
// the other family, invalid ones and ones outside the range are ignored; a
// taken prefix longer than the subnet length blocks the subnet holding it,
// a shorter one every subnet it covers.
//
// rng is the random source (math/rand/v2); nil uses the package's top-level
// functions. The cost is O(t log t) for t taken prefixes, independent of the
// size of the range (up to 2^63 subnets, the limit Validate enforces).
//
// Errors: a *ConfigError (wrapping ErrInvalidConfig) when c is invalid; an
// error wrapping ErrNoFreeSubnet naming the network when a family is full.
// Allocate changes nothing and may be called again with the same inputs.
func (c Config) Allocate(taken []Lease, previous Lease, rng *rand.Rand) (Lease, error) {
	if err := c.Validate(); err != nil {
		return Lease{}, err
	}
	var out Lease
	for _, s := range c.spaces() {
		p, err := s.allocate(taken, s.of(previous), rng)
		if err != nil {
			return Lease{}, err
		}
		if s.is4 {
			out.Subnet = p
		} else {
			out.IPv6Subnet = p
		}
	}
	return out, nil
}

// of returns l's subnet of s's family.
func (s space) of(l Lease) netip.Prefix {
	if s.is4 {
		return l.Subnet
	}
	return l.IPv6Subnet
}

// allocate picks a free subnet of s, preferring prev.
func (s space) allocate(taken []Lease, prev netip.Prefix, rng *rand.Rand) (netip.Prefix, error) {
	prevOK := prev.IsValid() && s.check(prev) == nil
	var prevIdx uint64
	if prevOK {
		prevIdx = s.index(prev.Addr())
	}

	// Most taken prefixes block one subnet: sort those as plain integers
	// (much faster than sorting spans) and merge in the few wider spans.
	singles := make([]uint64, 0, len(taken))
	var wide []span
	for i := range taken {
		sp, ok := s.overlap(s.of(taken[i]))
		if !ok {
			continue
		}
		if prevOK && sp.first <= prevIdx && prevIdx <= sp.last {
			prevOK = false
		}
		if sp.first == sp.last {
			singles = append(singles, sp.first)
		} else {
			wide = append(wide, sp)
		}
	}
	if prevOK {
		return prev, nil
	}
	spans := mergeSpans(singles, wide)

	var used uint64
	for _, sp := range spans {
		used += sp.last - sp.first + 1
	}
	free := s.count() - used
	if free == 0 {
		return netip.Prefix{}, fmt.Errorf("allocate %s subnet: all %d /%d subnets of %s from %s to %s are taken: %w",
			s.family, s.count(), s.subLen, s.network, s.min, s.max, ErrNoFreeSubnet)
	}

	var r uint64
	if rng != nil {
		r = rng.Uint64N(free)
	} else {
		r = rand.Uint64N(free)
	}
	// The r-th free index: walk the gaps between the taken spans.
	next := s.lo
	for _, sp := range spans {
		if gap := sp.first - next; r < gap {
			break
		} else {
			r -= gap
		}
		next = sp.last + 1
	}
	return s.subnet(next + r), nil
}

// mergeSpans sorts singles (one-subnet spans) and wide, and returns the
// union of both as sorted, disjoint, non-adjacent spans. It sorts its
// arguments in place.
func mergeSpans(singles []uint64, wide []span) []span {
	slices.Sort(singles)
	slices.SortFunc(wide, func(a, b span) int { return cmp.Compare(a.first, b.first) })
	out := make([]span, 0, len(singles)+len(wide))
	add := func(sp span) {
		if n := len(out); n > 0 && sp.first <= out[n-1].last+1 {
			out[n-1].last = max(out[n-1].last, sp.last)
			return
		}
		out = append(out, sp)
	}
	i, j := 0, 0
	for i < len(singles) || j < len(wide) {
		if j == len(wide) || (i < len(singles) && singles[i] < wide[j].first) {
			add(span{singles[i], singles[i]})
			i++
		} else {
			add(wide[j])
			j++
		}
	}
	return out
}
