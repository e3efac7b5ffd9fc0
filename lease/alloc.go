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
		prefixes := make([]netip.Prefix, 0, len(taken))
		prev := previous.Subnet
		for _, l := range taken {
			if s.is4 {
				prefixes = append(prefixes, l.Subnet)
			} else {
				prefixes = append(prefixes, l.IPv6Subnet)
			}
		}
		if !s.is4 {
			prev = previous.IPv6Subnet
		}
		p, err := s.allocate(prefixes, prev, rng)
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

// allocate picks a free subnet of s, preferring prev.
func (s space) allocate(taken []netip.Prefix, prev netip.Prefix, rng *rand.Rand) (netip.Prefix, error) {
	prevOK := prev.IsValid() && s.check(prev) == nil
	var prevIdx uint64
	if prevOK {
		prevIdx = s.index(prev.Addr())
	}

	spans := make([]span, 0, len(taken))
	for _, p := range taken {
		sp, ok := s.overlap(p)
		if !ok {
			continue
		}
		if prevOK && sp.first <= prevIdx && prevIdx <= sp.last {
			prevOK = false
		}
		spans = append(spans, sp)
	}
	if prevOK {
		return prev, nil
	}
	spans = mergeSpans(spans)

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

// mergeSpans sorts spans and merges overlapping or adjacent ones in place.
func mergeSpans(spans []span) []span {
	if len(spans) < 2 {
		return spans
	}
	slices.SortFunc(spans, func(a, b span) int { return cmp.Compare(a.first, b.first) })
	out := spans[:1]
	for _, sp := range spans[1:] {
		last := &out[len(out)-1]
		if sp.first <= last.last+1 {
			last.last = max(last.last, sp.last)
			continue
		}
		out = append(out, sp)
	}
	return out
}
