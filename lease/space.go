package lease

import "net/netip"

// u128 is an address as a 128-bit unsigned integer (IPv4 in the low 32 bits).
type u128 struct{ hi, lo uint64 }

func addrU128(a netip.Addr) u128 {
	if a.Is4() {
		b := a.As4()
		return u128{lo: uint64(b[0])<<24 | uint64(b[1])<<16 | uint64(b[2])<<8 | uint64(b[3])}
	}
	b := a.As16()
	var x u128
	for i := 0; i < 8; i++ {
		x.hi = x.hi<<8 | uint64(b[i])
		x.lo = x.lo<<8 | uint64(b[8+i])
	}
	return x
}

func (x u128) addr(is4 bool) netip.Addr {
	if is4 {
		v := uint32(x.lo)
		return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
	}
	var b [16]byte
	for i := 0; i < 8; i++ {
		b[i] = byte(x.hi >> (56 - 8*i))
		b[8+i] = byte(x.lo >> (56 - 8*i))
	}
	return netip.AddrFrom16(b)
}

func (x u128) shl(n uint) u128 {
	switch {
	case n == 0:
		return x
	case n >= 128:
		return u128{}
	case n >= 64:
		return u128{hi: x.lo << (n - 64)}
	default:
		return u128{hi: x.hi<<n | x.lo>>(64-n), lo: x.lo << n}
	}
}

func (x u128) shr(n uint) u128 {
	switch {
	case n == 0:
		return x
	case n >= 128:
		return u128{}
	case n >= 64:
		return u128{lo: x.hi >> (n - 64)}
	default:
		return u128{hi: x.hi >> n, lo: x.lo>>n | x.hi<<(64-n)}
	}
}

func (x u128) or(y u128) u128 { return u128{hi: x.hi | y.hi, lo: x.lo | y.lo} }

// ones returns an integer with the low n bits set.
func ones(n uint) u128 {
	switch {
	case n >= 128:
		return u128{hi: ^uint64(0), lo: ^uint64(0)}
	case n >= 64:
		return u128{hi: 1<<(n-64) - 1, lo: ^uint64(0)}
	default:
		return u128{lo: 1<<n - 1}
	}
}

// maxSubnetBits caps SubnetLen - Network prefix length (and so the number of
// subnets, 2^maxSubnetBits) so that subnet indexes fit a uint64 with room to
// count them.
const maxSubnetBits = 63

// space is one address family's subnet space of a valid Config: subnets of
// length subLen inside network, numbered 0..2^width-1 from the network
// address, of which [lo, hi] are allocatable.
type space struct {
	family  string // "IPv4" or "IPv6"
	network netip.Prefix
	subLen  int
	is4     bool
	shift   uint   // address bits below the subnet prefix
	width   uint   // subLen - network bits, at most maxSubnetBits
	base    u128   // network address
	lo, hi  uint64 // indexes of SubnetMin and SubnetMax
	min     netip.Addr
	max     netip.Addr
}

// spaces returns the subnet spaces of the enabled families. c must be valid.
func (c Config) spaces() []space {
	var out []space
	if c.EnableIPv4 {
		out = append(out, newSpace("IPv4", c.Network, c.SubnetLen, c.SubnetMin, c.SubnetMax))
	}
	if c.EnableIPv6 {
		out = append(out, newSpace("IPv6", c.IPv6Network, c.IPv6SubnetLen, c.IPv6SubnetMin, c.IPv6SubnetMax))
	}
	return out
}

func newSpace(family string, network netip.Prefix, subLen int, min, max netip.Addr) space {
	s := space{
		family:  family,
		network: network,
		subLen:  subLen,
		is4:     network.Addr().Is4(),
		shift:   uint(network.Addr().BitLen() - subLen),
		width:   uint(subLen - network.Bits()),
		base:    addrU128(network.Addr()),
		min:     min,
		max:     max,
	}
	s.lo = s.index(min)
	s.hi = s.index(max)
	return s
}

// index returns the number of the subnet holding a, an address inside the
// network.
func (s space) index(a netip.Addr) uint64 {
	return s.indexU(addrU128(a))
}

func (s space) indexU(x u128) uint64 {
	return x.shr(s.shift).lo & (1<<s.width - 1)
}

// subnet returns subnet number i.
func (s space) subnet(i uint64) netip.Prefix {
	a := s.base.or(u128{lo: i}.shl(s.shift))
	return netip.PrefixFrom(a.addr(s.is4), s.subLen)
}

// span is an inclusive range of subnet indexes.
type span struct{ first, last uint64 }

// overlap returns the subnet indexes in [lo, hi] that p overlaps, and false
// when there are none (p of the other family, outside the range, or
// invalid). A p longer than the subnet length blocks the subnet holding it;
// a shorter one blocks every subnet it covers.
func (s space) overlap(p netip.Prefix) (span, bool) {
	if !p.IsValid() || p.Addr().Is4() != s.is4 || (!s.is4 && p.Addr().Is4In6()) {
		return span{}, false
	}
	p = p.Masked()
	if !p.Overlaps(s.network) {
		return span{}, false
	}
	var sp span
	switch b := p.Bits(); {
	case b >= s.subLen:
		i := s.index(p.Addr())
		sp = span{i, i}
	case b <= s.network.Bits():
		sp = span{0, 1<<s.width - 1}
	default:
		i := s.index(p.Addr())
		sp = span{i, i + (1 << uint(s.subLen-b)) - 1}
	}
	sp.first = max(sp.first, s.lo)
	sp.last = min(sp.last, s.hi)
	return sp, sp.first <= sp.last
}

// count returns how many subnets [lo, hi] holds (at most 2^63).
func (s space) count() uint64 { return s.hi - s.lo + 1 }
