package lease

import (
	"fmt"
	"math/big"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sync/atomic"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// nthSubnet returns subnet i (of length subLen) of network, computed with
// math/big so that it shares no arithmetic with the allocator.
func nthSubnet(network netip.Prefix, subLen int, i uint64) netip.Prefix {
	a := network.Addr()
	n := new(big.Int).SetBytes(a.AsSlice())
	off := new(big.Int).Lsh(new(big.Int).SetUint64(i), uint(a.BitLen()-subLen))
	n.Add(n, off)
	buf := make([]byte, a.BitLen()/8)
	n.FillBytes(buf)
	out, ok := netip.AddrFromSlice(buf)
	if !ok {
		panic("bad address length")
	}
	return netip.PrefixFrom(out, subLen)
}

// randomAddr returns a random address of the family.
func randomAddr(rng *rand.Rand, is4 bool) netip.Addr {
	if is4 {
		var b [4]byte
		for i := range b {
			b[i] = byte(rng.UintN(256))
		}
		return netip.AddrFrom4(b)
	}
	var b [16]byte
	for i := range b {
		b[i] = byte(rng.UintN(256))
	}
	return netip.AddrFrom16(b)
}

// famCase is one family of a random test config, with at most 2^7 subnets
// so that the free set can be enumerated.
type famCase struct {
	network          netip.Prefix
	subLen           int
	minIdx, maxIdx   uint64
	all              []netip.Prefix // subnets in [min, max]
	is4              bool
	subnetsInNetwork uint64
}

func randomFamily(rng *rand.Rand, is4 bool) famCase {
	maxSub := 30
	if !is4 {
		maxSub = 126
	}
	width := 2 + rng.IntN(6) // 4..128 subnets in the network
	bits := rng.IntN(maxSub - width + 1)
	f := famCase{is4: is4, subLen: bits + width, subnetsInNetwork: 1 << width}
	f.network = netip.PrefixFrom(randomAddr(rng, is4), bits).Masked()
	f.minIdx = rng.Uint64N(f.subnetsInNetwork)
	f.maxIdx = f.minIdx + rng.Uint64N(f.subnetsInNetwork-f.minIdx)
	for i := f.minIdx; i <= f.maxIdx; i++ {
		f.all = append(f.all, nthSubnet(f.network, f.subLen, i))
	}
	return f
}

// randomTaken returns prefixes of the family: a random share of the
// subnets in range plus noise (other lengths, outside the network).
func (f famCase) randomTaken(rng *rand.Rand) []netip.Prefix {
	var out []netip.Prefix
	share := rng.Float64()
	if rng.IntN(5) == 0 {
		share = 1 // often exhaust the range
	}
	for _, p := range f.all {
		if rng.Float64() < share {
			out = append(out, p)
		}
	}
	for range rng.IntN(4) {
		i := rng.Uint64N(f.subnetsInNetwork)
		bits := f.network.Bits() + rng.IntN(f.network.Addr().BitLen()-f.network.Bits()+1)
		out = append(out, netip.PrefixFrom(nthSubnet(f.network, f.subLen, i).Addr(), bits).Masked())
	}
	for range rng.IntN(3) {
		out = append(out, netip.PrefixFrom(randomAddr(rng, f.is4), rng.IntN(f.network.Addr().BitLen()+1)).Masked())
	}
	rng.Shuffle(len(out), func(i, j int) { out[i], out[j] = out[j], out[i] })
	return out
}

// free returns the subnets in range that no taken prefix overlaps.
func (f famCase) free(taken []netip.Prefix) map[netip.Prefix]bool {
	out := map[netip.Prefix]bool{}
	for _, s := range f.all {
		ok := true
		for _, p := range taken {
			if p.IsValid() && p.Overlaps(s) {
				ok = false
				break
			}
		}
		if ok {
			out[s] = true
		}
	}
	return out
}

func (f famCase) randomPrevious(rng *rand.Rand) netip.Prefix {
	switch rng.IntN(6) {
	case 0:
		return netip.Prefix{}
	case 1: // any subnet of the network, maybe outside [min, max]
		return nthSubnet(f.network, f.subLen, rng.Uint64N(f.subnetsInNetwork))
	case 2: // wrong length
		return netip.PrefixFrom(f.all[0].Addr(), f.subLen-1).Masked()
	case 3: // host bits
		return netip.PrefixFrom(f.all[0].Addr().Next(), f.subLen)
	default: // in range
		return f.all[rng.IntN(len(f.all))]
	}
}

func TestAllocateProperties(t *testing.T) {
	t.Parallel()
	// What the random cases covered, to show the test is not vacuous.
	var exhausted, keptPrevious, drawn atomic.Int64
	t.Run("seeds", func(t *testing.T) {
		testAllocateProperties(t, &exhausted, &keptPrevious, &drawn)
	})
	t.Logf("exhausted %d, kept previous %d, drawn %d", exhausted.Load(), keptPrevious.Load(), drawn.Load())
	assert.Positive(t, exhausted.Load())
	assert.Positive(t, keptPrevious.Load())
	assert.Positive(t, drawn.Load())
}

func testAllocateProperties(t *testing.T, exhausted, keptPrevious, drawn *atomic.Int64) {
	for seed := range uint64(400) {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			t.Parallel()
			rng := rand.New(rand.NewPCG(seed, 0x5eed))
			mode := seed % 3 // 0 v4, 1 v6, 2 dual
			var c Config
			var fams []famCase
			if mode != 1 {
				f := randomFamily(rng, true)
				fams = append(fams, f)
				c.EnableIPv4, c.Network, c.SubnetLen = true, f.network, f.subLen
				c.SubnetMin, c.SubnetMax = f.all[0].Addr(), f.all[len(f.all)-1].Addr()
			}
			if mode != 0 {
				f := randomFamily(rng, false)
				fams = append(fams, f)
				c.EnableIPv6, c.IPv6Network, c.IPv6SubnetLen = true, f.network, f.subLen
				c.IPv6SubnetMin, c.IPv6SubnetMax = f.all[0].Addr(), f.all[len(f.all)-1].Addr()
			}
			c = c.WithDefaults()
			require.NoError(t, c.Validate())

			// Taken leases: per family prefixes zipped into leases.
			var taken []Lease
			var frees []map[netip.Prefix]bool
			var prev Lease
			for _, f := range fams {
				ps := f.randomTaken(rng)
				frees = append(frees, f.free(ps))
				pp := f.randomPrevious(rng)
				for i, p := range ps {
					for len(taken) <= i {
						taken = append(taken, Lease{})
					}
					if f.is4 {
						taken[i].Subnet = p
					} else {
						taken[i].IPv6Subnet = p
					}
				}
				if f.is4 {
					prev.Subnet = pp
				} else {
					prev.IPv6Subnet = pp
				}
			}

			for range 5 {
				got, err := c.Allocate(taken, prev, rng)
				full := false
				for _, fr := range frees {
					full = full || len(fr) == 0
				}
				if full {
					exhausted.Add(1)
					require.ErrorIs(t, err, ErrNoFreeSubnet)
					assert.Contains(t, err.Error(), "taken")
					continue
				}
				require.NoError(t, err)
				require.NoError(t, c.CheckLease(got))
				for i, f := range fams {
					p, pp := got.Subnet, prev.Subnet
					if !f.is4 {
						p, pp = got.IPv6Subnet, prev.IPv6Subnet
					}
					require.True(t, frees[i][p], "%s not free", p)
					if frees[i][pp] {
						keptPrevious.Add(1)
						require.Equal(t, pp, p, "free valid previous not honoured")
					} else {
						drawn.Add(1)
					}
				}
				if mode == 0 {
					assert.False(t, got.IPv6Subnet.IsValid())
				}
				if mode == 1 {
					assert.False(t, got.Subnet.IsValid())
				}
			}
		})
	}
}

func TestAllocateExhaustion(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		conf string
		want int
	}{
		{"v4 /26 in /30s", `{"Network":"10.1.2.0/26","SubnetLen":30}`, 15},
		{"v4 /26 default /28s", `{"Network":"10.1.2.0/26"}`, 3},
		{"v4 min max", `{"Network":"10.0.0.0/16","SubnetMin":"10.0.10.0","SubnetMax":"10.0.40.0"}`, 31},
		{"v6 /58", `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/58"}`, 63},
		{"dual, v4 smaller", `{"EnableIPv6":true,"Network":"10.1.2.0/27","SubnetLen":30,"IPv6Network":"fd00::/56"}`, 7},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c, err := ParseConfig([]byte(tt.conf))
			require.NoError(t, err)
			rng := rand.New(rand.NewPCG(1, 2))
			var taken []Lease
			seen := map[string]bool{}
			for {
				l, err := c.Allocate(taken, Lease{}, rng)
				if err != nil {
					require.ErrorIs(t, err, ErrNoFreeSubnet)
					break
				}
				require.NoError(t, c.CheckLease(l))
				require.False(t, seen[l.Key()], "duplicate %s", l)
				seen[l.Key()] = true
				taken = append(taken, l)
				require.LessOrEqual(t, len(taken), tt.want)
			}
			assert.Len(t, taken, tt.want)
			_, err = c.Allocate(taken, taken[0], rng)
			assert.ErrorIs(t, err, ErrNoFreeSubnet, "a taken previous is not handed out again")
		})
	}
}

func TestAllocateDistribution(t *testing.T) {
	t.Parallel()
	// 10.0.0.0/26 in /30s: subnets 1..15; take 1, 2, 3 and 9 (the clustered
	// ones must not make 4 and 10 more likely, as probing would).
	c, err := ParseConfig([]byte(`{"Network":"10.0.0.0/26","SubnetLen":30}`))
	require.NoError(t, err)
	var taken []Lease
	for _, i := range []uint64{1, 2, 3, 9} {
		taken = append(taken, Lease{Subnet: nthSubnet(c.Network, 30, i)})
	}
	const draws = 11000 // 11 free subnets: 1000 each expected
	rng := rand.New(rand.NewPCG(7, 7))
	counts := map[netip.Prefix]int{}
	for range draws {
		l, err := c.Allocate(taken, Lease{}, rng)
		require.NoError(t, err)
		counts[l.Subnet]++
	}
	require.Len(t, counts, 11, "every free subnet is reachable")
	for p, n := range counts {
		// 6 standard deviations (~31) either side: never flaky with this seed,
		// and far tighter than the 2x bias of random-then-probe.
		assert.InDelta(t, 1000, n, 200, "%s drawn %d times", p, n)
	}
	for _, l := range taken {
		assert.Zero(t, counts[l.Subnet])
	}
}

func TestAllocatePrevious(t *testing.T) {
	t.Parallel()
	p := netip.MustParsePrefix
	c := dualConfig()
	taken := []Lease{
		{Subnet: p("10.244.5.0/24"), IPv6Subnet: p("fd00:10:244:5::/64")},
		{Subnet: p("10.244.6.0/23")}, // blocks 6 and 7
		{IPv6Subnet: p("fd00:10:244:8::/62")},
	}
	tests := []struct {
		name    string
		prev    Lease
		keepV4  bool
		keepV6  bool
		avoidV4 []netip.Prefix
		avoidV6 []netip.Prefix
	}{
		{"free, both kept", Lease{Subnet: p("10.244.9.0/24"), IPv6Subnet: p("fd00:10:244:20::/64")}, true, true, nil, nil},
		{"v4 only kept", Lease{Subnet: p("10.244.9.0/24")}, true, false, nil, nil},
		{"v4 taken", Lease{Subnet: p("10.244.5.0/24"), IPv6Subnet: p("fd00:10:244:20::/64")}, false, true, []netip.Prefix{p("10.244.5.0/24")}, nil},
		{"v4 blocked by a shorter prefix", Lease{Subnet: p("10.244.7.0/24")}, false, false, []netip.Prefix{p("10.244.7.0/24")}, nil},
		{"v6 inside a taken /62", Lease{IPv6Subnet: p("fd00:10:244:b::/64")}, false, false, nil, []netip.Prefix{p("fd00:10:244:b::/64")}},
		{"v4 below min", Lease{Subnet: p("10.244.0.0/24")}, false, false, []netip.Prefix{p("10.244.0.0/24")}, nil},
		{"v4 wrong length", Lease{Subnet: p("10.244.9.0/25")}, false, false, nil, nil},
		{"v4 other network", Lease{Subnet: p("10.9.9.0/24")}, false, false, nil, nil},
		{"v6 wrong length", Lease{IPv6Subnet: p("fd00:10:244:9::/65")}, false, false, nil, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			rng := rand.New(rand.NewPCG(3, 4))
			for range 50 {
				got, err := c.Allocate(taken, tt.prev, rng)
				require.NoError(t, err)
				require.NoError(t, c.CheckLease(got))
				if tt.keepV4 {
					require.Equal(t, tt.prev.Subnet, got.Subnet)
				}
				if tt.keepV6 {
					require.Equal(t, tt.prev.IPv6Subnet, got.IPv6Subnet)
				}
				for _, l := range taken {
					require.False(t, l.Subnet.IsValid() && l.Subnet.Overlaps(got.Subnet), "%s overlaps taken %s", got.Subnet, l.Subnet)
					require.False(t, l.IPv6Subnet.IsValid() && l.IPv6Subnet.Overlaps(got.IPv6Subnet), "%s overlaps taken %s", got.IPv6Subnet, l.IPv6Subnet)
				}
				assert.NotContains(t, tt.avoidV4, got.Subnet)
				assert.NotContains(t, tt.avoidV6, got.IPv6Subnet)
			}
		})
	}
}

func TestAllocateLargeIPv6(t *testing.T) {
	t.Parallel()
	p := netip.MustParsePrefix
	tests := []struct {
		name    string
		conf    string
		taken   []Lease
		want    netip.Prefix // within
		wantErr bool
	}{
		{"/8 in /64s", `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/8"}`, nil, p("fd00::/8"), false},
		{"/32 in /64s", `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"2001:db8::/32"}`, nil, p("2001:db8::/32"), false},
		{"::/1 in /64s (2^63)", `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"::/1","IPv6SubnetLen":64}`, nil, p("::/1"), false},
		{"lower half taken", `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/48"}`,
			[]Lease{{IPv6Subnet: p("fd00::/49")}}, p("fd00:0:0:8000::/49"), false},
		{"all taken by two halves", `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/48"}`,
			[]Lease{{IPv6Subnet: p("fd00::/49")}, {IPv6Subnet: p("fd00:0:0:8000::/49")}}, netip.Prefix{}, true},
		{"all taken by a supernet", `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/48"}`,
			[]Lease{{IPv6Subnet: p("fc00::/7")}}, netip.Prefix{}, true},
		{"one left in /8", `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/8","IPv6SubnetMin":"fd12:3456:789a:bcde::","IPv6SubnetMax":"fd12:3456:789a:bcdf::"}`,
			[]Lease{{IPv6Subnet: p("fd12:3456:789a:bcde::/64")}}, p("fd12:3456:789a:bcdf::/64"), false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c, err := ParseConfig([]byte(tt.conf))
			require.NoError(t, err)
			rng := rand.New(rand.NewPCG(5, 6))
			for range 20 {
				l, err := c.Allocate(tt.taken, Lease{}, rng)
				if tt.wantErr {
					require.ErrorIs(t, err, ErrNoFreeSubnet)
					assert.Contains(t, err.Error(), c.IPv6Network.String())
					return
				}
				require.NoError(t, err)
				require.NoError(t, c.CheckLease(l))
				assert.True(t, tt.want.Contains(l.IPv6Subnet.Addr()), "%s not in %s", l.IPv6Subnet, tt.want)
			}
			// A valid, free previous is honoured however large the range.
			prev, err := c.Allocate(tt.taken, Lease{}, rng)
			require.NoError(t, err)
			again, err := c.Allocate(tt.taken, prev, nil)
			require.NoError(t, err)
			assert.Equal(t, prev, again)
		})
	}
}

func TestAllocateNilRand(t *testing.T) {
	t.Parallel()
	c := dualConfig()
	l, err := c.Allocate(nil, Lease{}, nil)
	require.NoError(t, err)
	assert.NoError(t, c.CheckLease(l))
}

func TestAllocateInvalidConfig(t *testing.T) {
	t.Parallel()
	_, err := Config{EnableIPv4: true}.Allocate(nil, Lease{}, nil)
	assert.ErrorIs(t, err, ErrInvalidConfig)
	assert.NotErrorIs(t, err, ErrNoFreeSubnet)
}

func TestAllocateIgnoresForeignLeases(t *testing.T) {
	t.Parallel()
	c, err := ParseConfig([]byte(`{"Network":"10.0.0.0/28"}`)) // /30s 1..3
	require.NoError(t, err)
	p := netip.MustParsePrefix
	taken := []Lease{
		{Subnet: p("10.0.0.4/30")}, {Subnet: p("10.0.0.8/30")},
		{Subnet: p("10.0.0.0/30")},                                      // below min
		{Subnet: p("10.9.0.0/16")},                                      // other network
		{IPv6Subnet: p("fd00::/64")},                                    // other family
		{Subnet: p("::ffff:10.0.0.12/126")},                             // IPv4-mapped: not IPv4
		{Subnet: netip.PrefixFrom(netip.MustParseAddr("10.0.0.5"), 30)}, // unmasked: blocks its subnet
	}
	rng := rand.New(rand.NewPCG(8, 9))
	for range 20 {
		l, err := c.Allocate(taken, Lease{}, rng)
		require.NoError(t, err)
		assert.Equal(t, p("10.0.0.12/30"), l.Subnet)
	}
}

// benchTaken returns a /8-in-/24s config and n distinct taken leases.
func benchTaken(b *testing.B, n int) (Config, []Lease) {
	c, err := ParseConfig([]byte(`{"Network":"10.0.0.0/8"}`))
	require.NoError(b, err)
	rng := rand.New(rand.NewPCG(10, 11))
	perm := rng.Perm(65535)
	taken := make([]Lease, n)
	for i := range taken {
		taken[i] = Lease{Subnet: nthSubnet(c.Network, 24, uint64(perm[i]+1))}
	}
	return c, taken
}

func BenchmarkAllocate(b *testing.B) {
	c, taken := benchTaken(b, 50000)
	rng := rand.New(rand.NewPCG(1, 1))
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if _, err := c.Allocate(taken, Lease{}, rng); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSortBaseline sorts as many integers as BenchmarkAllocate has
// taken leases: the floor for an allocator that sorts, measured in the same
// run so the two can be compared on a busy machine.
func BenchmarkSortBaseline(b *testing.B) {
	rng := rand.New(rand.NewPCG(10, 11))
	src := make([]uint64, 50000)
	for i := range src {
		src[i] = rng.Uint64N(65535)
	}
	buf := make([]uint64, len(src))
	for b.Loop() {
		copy(buf, src)
		slices.Sort(buf)
	}
}
