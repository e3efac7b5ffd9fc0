package lease

import (
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestPeers(t *testing.T) {
	t.Parallel()
	v4 := Config{EnableIPv4: true, Network: netip.MustParsePrefix("10.69.0.0/16")}.WithDefaults()
	pfx := netip.MustParsePrefix
	cand := func(name, subnet string, order int64) Candidate {
		return Candidate{Name: name, Lease: Lease{Subnet: pfx(subnet)}, Order: order}
	}
	own := func(c Candidate) Candidate { c.Own = true; return c }
	v6cand := func(name, subnet string) Candidate {
		return Candidate{Name: name, Lease: Lease{Subnet: pfx("10.69.9.0/24"), IPv6Subnet: pfx(subnet)}}
	}
	tests := []struct {
		name    string
		cfg     Config
		cands   []Candidate
		own     Lease
		valid   []string
		ignored map[string]Rule
	}{
		{name: "all valid", cfg: v4, cands: []Candidate{cand("a", "10.69.1.0/24", 1), cand("b", "10.69.2.0/24", 2)}, valid: []string{"a", "b"}},
		{name: "outside the network", cfg: v4, cands: []Candidate{cand("a", "172.0.0.0/8", 1), cand("b", "10.70.0.0/24", 2), cand("c", "10.69.1.0/24", 3)},
			valid: []string{"c"}, ignored: map[string]Rule{"a": RuleOutside, "b": RuleOutside}},
		{name: "wider than the network", cfg: v4, cands: []Candidate{cand("a", "0.0.0.0/1", 1), cand("b", "10.0.0.0/8", 2)},
			ignored: map[string]Rule{"a": RuleOutside, "b": RuleOutside}},
		{name: "wrong length", cfg: v4, cands: []Candidate{cand("a", "10.69.0.0/16", 1), cand("b", "10.69.1.0/25", 2), cand("c", "10.69.4.0/23", 3)},
			ignored: map[string]Rule{"a": RuleLength, "b": RuleLength, "c": RuleLength}},
		{name: "no subnet", cfg: v4, cands: []Candidate{{Name: "a"}}, ignored: map[string]Rule{"a": RuleOutside}},
		{name: "family not enabled", cfg: v4, cands: []Candidate{v6cand("a", "fd00::/64")}, ignored: map[string]Rule{"a": RuleOutside}},
		{name: "overlap: the older wins", cfg: v4,
			cands: []Candidate{cand("new", "10.69.1.0/24", 7), cand("old", "10.69.1.0/24", 3), cand("other", "10.69.2.0/24", 9)},
			valid: []string{"old", "other"}, ignored: map[string]Rule{"new": RuleOverlap}},
		{name: "overlap: same age, both ignored", cfg: v4,
			cands:   []Candidate{cand("a", "10.69.1.0/24", 3), cand("b", "10.69.1.0/24", 3), cand("c", "10.69.1.0/24", 4)},
			ignored: map[string]Rule{"a": RuleOverlap, "b": RuleOverlap, "c": RuleOverlap}},
		{name: "overlap with an invalid lease does not count", cfg: v4,
			cands: []Candidate{cand("wide", "10.69.0.0/16", 1), cand("a", "10.69.1.0/24", 2)},
			valid: []string{"a"}, ignored: map[string]Rule{"wide": RuleLength}},
		{name: "own subnet claimed by another node", cfg: v4,
			cands: []Candidate{cand("thief", "10.69.1.0/24", 1), own(cand("me", "10.69.1.0/24", 5))},
			valid: []string{"me"}, ignored: map[string]Rule{"thief": RuleOwnSubnet}},
		{name: "own subnet from the own lease alone", cfg: v4, own: Lease{Subnet: pfx("10.69.1.0/24")},
			cands: []Candidate{cand("thief", "10.69.1.0/24", 1), cand("b", "10.69.2.0/24", 2)},
			valid: []string{"b"}, ignored: map[string]Rule{"thief": RuleOwnSubnet}},
		{name: "own lease among peers", cfg: v4, own: Lease{Subnet: pfx("10.69.2.0/24")},
			cands: []Candidate{cand("a", "10.69.1.0/24", 1), own(cand("me", "10.69.2.0/24", 2)), cand("c", "10.69.3.0/24", 3)},
			valid: []string{"a", "me", "c"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			v := tc.cfg.Peers(tc.cands, tc.own)
			var valid []string
			for _, c := range v.Valid {
				valid = append(valid, c.Name)
			}
			ignored := map[string]Rule{}
			for _, ig := range v.Ignored {
				ignored[ig.Name] = ig.Rule
				assert.NotEmpty(t, ig.Detail, ig.Name)
			}
			assert.Equal(t, tc.valid, valid)
			if tc.ignored == nil {
				tc.ignored = map[string]Rule{}
			}
			assert.Equal(t, tc.ignored, ignored)
			assert.Len(t, v.Leases(), len(valid))
			leases, ig := tc.cfg.PeerLeases(tc.cands, tc.own)
			want := v.Leases() // own's moved first
			if i := slices.IndexFunc(want, tc.own.SameSubnets); tc.own.Subnet.IsValid() && i >= 0 {
				first := want[i]
				want = append([]Lease{first}, slices.Delete(want, i, i+1)...)
			}
			assert.Equal(t, want, leases, "PeerLeases gives Peers' valid leases, own's first")
			assert.Equal(t, v.Ignored, ig, "and its ignored candidates")
		})
	}
}

func TestPeersTaken(t *testing.T) {
	t.Parallel()
	cfg := Config{EnableIPv4: true, Network: netip.MustParsePrefix("10.69.0.0/16")}.WithDefaults()
	l := func(s string) Lease { return Lease{Subnet: netip.MustParsePrefix(s)} }
	v := cfg.Peers([]Candidate{
		{Name: "hostile", Lease: l("0.0.0.0/1")},
		{Name: "a", Lease: l("10.69.1.0/24"), Order: 1},
		{Name: "b", Lease: l("10.69.1.0/24"), Order: 2},
		{Name: "c", Lease: l("10.69.2.0/24"), Order: 3},
	}, Lease{})
	assert.Equal(t, []Lease{l("10.69.1.0/24"), l("10.69.2.0/24"), l("10.69.1.0/24")}, v.Taken(),
		"the overlapping lease still holds its subnet; the hostile one holds nothing")
	got, err := cfg.Allocate(v.Taken(), Lease{}, nil)
	assert.NoError(t, err, "a hostile 0.0.0.0/1 does not exhaust the network")
	assert.True(t, cfg.Network.Contains(got.Subnet.Addr()))
}

func TestPeersDualStack(t *testing.T) {
	t.Parallel()
	cfg := dualConfig()
	pfx := netip.MustParsePrefix
	v := cfg.Peers([]Candidate{
		{Name: "dual", Lease: Lease{Subnet: pfx("10.244.1.0/24"), IPv6Subnet: pfx("fd00:10:244:1::/64")}},
		{Name: "v4 only", Lease: Lease{Subnet: pfx("10.244.2.0/24")}},
		{Name: "bad v6", Lease: Lease{Subnet: pfx("10.244.3.0/24"), IPv6Subnet: pfx("fd00:99::/64")}},
		{Name: "v6 len", Lease: Lease{IPv6Subnet: pfx("fd00:10:244:4::/80")}},
		{Name: "shares v6", Lease: Lease{Subnet: pfx("10.244.5.0/24"), IPv6Subnet: pfx("fd00:10:244:1::/64")}, Order: 1},
	}, Lease{})
	var valid []string
	for _, c := range v.Valid {
		valid = append(valid, c.Name)
	}
	assert.Equal(t, []string{"dual", "v4 only"}, valid)
	rules := map[string]Rule{}
	for _, ig := range v.Ignored {
		rules[ig.Name] = ig.Rule
	}
	assert.Equal(t, map[string]Rule{"bad v6": RuleOutside, "v6 len": RuleLength, "shares v6": RuleOverlap}, rules)
}

func TestWarnings(t *testing.T) {
	t.Parallel()
	var w Warnings
	a := Ignored{Candidate: Candidate{Name: "a", Lease: Lease{Subnet: netip.MustParsePrefix("172.0.0.0/8")}}, Rule: RuleOutside, Detail: "x"}
	b := Ignored{Candidate: Candidate{Name: "b", Lease: Lease{Subnet: netip.MustParsePrefix("10.0.0.0/8")}}, Rule: RuleOutside, Detail: "y"}
	assert.Equal(t, []Ignored{a}, w.Fresh([]Ignored{a}), "first report")
	assert.Empty(t, w.Fresh([]Ignored{a}), "same value: not again")
	assert.Equal(t, []Ignored{b}, w.Fresh([]Ignored{a, b}), "only the new one")
	a2 := a
	a2.Lease.Attrs.BackendType = "vxlan"
	assert.Equal(t, []Ignored{a2}, w.Fresh([]Ignored{a2, b}), "a changed value is reported again")
	assert.Empty(t, w.Fresh(nil))
	assert.Equal(t, []Ignored{a2}, w.Fresh([]Ignored{a2}), "forgotten once gone, reported when back")
}

func TestIdentity(t *testing.T) {
	t.Parallel()
	ip4, ip6 := netip.MustParseAddr("192.0.2.1"), netip.MustParseAddr("2001:db8::1")
	attrs := Attrs{PublicIP: ip4, PublicIPv6: ip6}
	v4 := Config{EnableIPv4: true}
	v6 := Config{EnableIPv6: true}
	dual := Config{EnableIPv4: true, EnableIPv6: true}
	assert.Equal(t, ip4, v4.Identity(attrs))
	assert.Equal(t, ip4, dual.Identity(attrs))
	assert.Equal(t, ip6, v6.Identity(attrs), "IPv6-only networks identify nodes by PublicIPv6")
	assert.False(t, v4.Identity(Attrs{PublicIPv6: ip6}).IsValid(), "no fallback to the other family")
	assert.True(t, v6.SameNode(attrs, Attrs{PublicIPv6: ip6}))
	assert.False(t, v4.SameNode(Attrs{}, Attrs{}), "no identity, no match")
	assert.Equal(t, ip6, Lease{IPv6Subnet: netip.MustParsePrefix("fd00::/64"), Attrs: attrs}.Identity())
	assert.Equal(t, ip4, Lease{Subnet: netip.MustParsePrefix("10.0.0.0/24"), Attrs: attrs}.Identity())
}

// BenchmarkPeerLeases judges N valid dual-stack-free vxlan-sized leases,
// as a store's Watch does on every change (go test -bench PeerLeases
// -benchmem ./lease: the allocations are the leases handed on, one mark
// per lease and the map of subnets).
func BenchmarkPeerLeases(b *testing.B) {
	cfg := Config{EnableIPv4: true, Network: netip.MustParsePrefix("10.0.0.0/8")}.WithDefaults()
	for _, n := range []int{5000, 20000} {
		cands := make([]Candidate, n)
		for i := range cands {
			p := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0}), 24)
			cands[i] = Candidate{Name: fmt.Sprintf("/coreos.com/network/subnets/%s-24", p.Addr()), Order: int64(i),
				Lease: Lease{Subnet: p, Attrs: Attrs{PublicIP: netip.AddrFrom4([4]byte{172, 16, byte(i >> 8), byte(i)}), BackendType: "vxlan"}}}
		}
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if leases, _ := cfg.PeerLeases(cands, Lease{}); len(leases) != n {
					b.Fatalf("%d valid leases, want %d", len(leases), n)
				}
			}
		})
	}
}

// TestDistinctAgreesWithSharedSubnets: the bitmap check finds a subnet
// held twice exactly when the map finds one, over random leases in
// networks whose subnet bits lie in the low word, the high word, and
// across both.
func TestDistinctAgreesWithSharedSubnets(t *testing.T) {
	t.Parallel()
	nets := []struct {
		v4, v6     string
		len4, len6 int
	}{
		{"10.244.0.0/16", "fd00:10:244::/56", 24, 64},
		{"10.0.0.0/8", "fd00::/60", 26, 72},
		{"10.69.0.0/16", "fd00:1::/104", 28, 120},
	}
	rng := rand.New(rand.NewPCG(3, 4))
	for _, nw := range nets {
		cfg := Config{EnableIPv4: true, EnableIPv6: true, Network: netip.MustParsePrefix(nw.v4), SubnetLen: nw.len4,
			IPv6Network: netip.MustParsePrefix(nw.v6), IPv6SubnetLen: nw.len6}
		pick := func(network netip.Prefix, subLen, span int) netip.Prefix {
			a := network.Addr().As16()
			if network.Addr().Is4() {
				a = netip.AddrFrom4(network.Addr().As4()).As16()
			}
			n := rng.IntN(span)
			// Put n into the bits just above the host bits (subLen..): the
			// subnet's number.
			bit := subLen - 1
			if network.Addr().Is4() {
				bit += 96
			}
			for k := 0; n > 0; k, n = k+1, n>>1 {
				if n&1 == 1 {
					a[(bit-k)/8] |= 0x80 >> ((bit - k) % 8)
				}
			}
			addr := netip.AddrFrom16(a)
			if network.Addr().Is4() {
				addr = addr.Unmap()
			}
			return netip.PrefixFrom(addr, subLen)
		}
		bufs := &verdictBufs{} // reused: each round starts from clear bitmaps
		for round := range 300 {
			span := 2 + rng.IntN(40)
			cands := make([]Candidate, 1+rng.IntN(30))
			for i := range cands {
				l := Lease{Subnet: pick(cfg.Network, cfg.SubnetLen, span)}
				if rng.IntN(2) == 0 {
					l.IPv6Subnet = pick(cfg.IPv6Network, cfg.IPv6SubnetLen, span)
				}
				cands[i] = Candidate{Name: fmt.Sprint(i), Lease: l}
			}
			bad := make([]mark, len(cands))
			for _, cd := range cands {
				r, d := cfg.Shape(cd.Lease)
				if !assert.Empty(t, r, "%s: %s", cd.Lease, d) {
					return
				}
			}
			assert.Equal(t, len(sharedSubnets(cands, bad)) == 0, cfg.distinct(cands, bad, bufs), "%s round %d: %v", nw.v4, round, cands)
		}
	}
}

// TestSubnetIndex: a subnet's number is the bits between the network's
// length and the subnet's.
func TestSubnetIndex(t *testing.T) {
	t.Parallel()
	pfx := netip.MustParsePrefix
	for _, tc := range []struct {
		network, subnet string
		want            uint64
	}{
		{"10.244.0.0/16", "10.244.0.0/24", 0},
		{"10.244.0.0/16", "10.244.255.0/24", 255},
		{"10.0.0.0/8", "10.1.2.0/24", 258},
		{"10.69.0.0/16", "10.69.3.16/28", 3*16 + 1},
		{"fd00:10:244::/56", "fd00:10:244:7::/64", 7},
		{"fd00::/60", "fd00:0:0:3:ab00::/72", 3<<8 | 0xab},
		{"fd00:1::/104", "fd00:1::12:3400/120", 0x1234},
	} {
		var b bitmap
		var words []uint64
		require.True(t, b.reset(pfx(tc.network), pfx(tc.subnet).Bits(), &words), tc.subnet)
		assert.Equal(t, tc.want, b.sp.index(pfx(tc.subnet).Addr()), tc.subnet)
	}
	var b bitmap
	var words []uint64
	assert.False(t, b.reset(pfx("fd00::/48"), 96, &words), "2^48 subnets: no bitmap")
}
