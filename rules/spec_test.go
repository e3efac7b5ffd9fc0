package rules

import (
	"net/netip"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestRuleSpecs(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name     string
		f        family
		ipt, nft []string
		fwdIPT   []string
		fwdNFT   []string
	}{
		{
			name: "ipv4",
			f:    family{network: netip.MustParsePrefix("10.244.0.0/16"), subnet: netip.MustParsePrefix("10.244.3.0/24"), randomFully: true},
			ipt: []string{
				"-m mark --mark 0x4000/0x4000 -m comment --comment flanneld masq -j RETURN",
				"-s 10.244.3.0/24 -d 10.244.0.0/16 -m comment --comment flanneld masq -j RETURN",
				"-s 10.244.0.0/16 -d 10.244.3.0/24 -m comment --comment flanneld masq -j RETURN",
				"! -s 10.244.0.0/16 -d 10.244.3.0/24 -m comment --comment flanneld masq -j RETURN",
				"-s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment flanneld masq -j MASQUERADE --random-fully",
				"! -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment flanneld masq -j MASQUERADE --random-fully",
			},
			nft: []string{
				"meta mark & 0x00004000 == 0x00004000 return",
				"ip saddr 10.244.3.0/24 ip daddr 10.244.0.0/16 return",
				"ip saddr 10.244.0.0/16 ip daddr 10.244.3.0/24 return",
				"ip saddr != 10.244.0.0/16 ip daddr 10.244.3.0/24 return",
				"ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random",
				"ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random",
			},
			fwdIPT: []string{
				"-s 10.244.0.0/16 -m comment --comment flanneld forward -j ACCEPT",
				"-d 10.244.0.0/16 -m comment --comment flanneld forward -j ACCEPT",
			},
			fwdNFT: []string{"ip saddr 10.244.0.0/16 accept", "ip daddr 10.244.0.0/16 accept"},
		},
		{
			name: "ipv6 without random-fully, unmasked input",
			f:    family{network: netip.MustParsePrefix("fd00:10:244::1/56"), subnet: netip.MustParsePrefix("fd00:10:244:3::1/64")},
			ipt: []string{
				"-m mark --mark 0x4000/0x4000 -m comment --comment flanneld masq -j RETURN",
				"-s fd00:10:244:3::/64 -d fd00:10:244::/56 -m comment --comment flanneld masq -j RETURN",
				"-s fd00:10:244::/56 -d fd00:10:244:3::/64 -m comment --comment flanneld masq -j RETURN",
				"! -s fd00:10:244::/56 -d fd00:10:244:3::/64 -m comment --comment flanneld masq -j RETURN",
				"-s fd00:10:244::/56 ! -d ff00::/8 -m comment --comment flanneld masq -j MASQUERADE",
				"! -s fd00:10:244::/56 -d fd00:10:244::/56 -m comment --comment flanneld masq -j MASQUERADE",
			},
			nft: []string{
				"meta mark & 0x00004000 == 0x00004000 return",
				"ip6 saddr fd00:10:244:3::/64 ip6 daddr fd00:10:244::/56 return",
				"ip6 saddr fd00:10:244::/56 ip6 daddr fd00:10:244:3::/64 return",
				"ip6 saddr != fd00:10:244::/56 ip6 daddr fd00:10:244:3::/64 return",
				"ip6 saddr fd00:10:244::/56 ip6 daddr != ff00::/8 masquerade",
				"ip6 saddr != fd00:10:244::/56 ip6 daddr fd00:10:244::/56 masquerade",
			},
			fwdIPT: []string{
				"-s fd00:10:244::/56 -m comment --comment flanneld forward -j ACCEPT",
				"-d fd00:10:244::/56 -m comment --comment flanneld forward -j ACCEPT",
			},
			fwdNFT: []string{"ip6 saddr fd00:10:244::/56 accept", "ip6 daddr fd00:10:244::/56 accept"},
		},
	}
	join := func(rs [][]string) []string {
		var out []string
		for _, r := range rs {
			out = append(out, strings.Join(r, " "))
		}
		return out
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.ipt, join(iptMasqRules(tc.f)))
			assert.Equal(t, tc.nft, nftMasqRules(tc.f))
			assert.Equal(t, tc.fwdIPT, join(iptFwdRules(tc.f)))
			assert.Equal(t, tc.fwdNFT, nftFwdRules(tc.f))
		})
	}
}

func TestNFTCommentTracksRuleSet(t *testing.T) {
	t.Parallel()
	a := nftMasqRules(family{network: netip.MustParsePrefix("10.244.0.0/16"), subnet: netip.MustParsePrefix("10.244.3.0/24")})
	b := nftMasqRules(family{network: netip.MustParsePrefix("10.244.0.0/16"), subnet: netip.MustParsePrefix("10.244.4.0/24")})
	assert.NotEqual(t, nftComment(nftPostrtg, a, 0), nftComment(nftPostrtg, b, 0), "another subnet must not look current")
	assert.NotEqual(t, nftComment(nftPostrtg, a, 0), nftComment(nftPostrtg, a, 1))
	assert.Equal(t, nftComment(nftPostrtg, a, 2), nftComment(nftPostrtg, a, 2))
	assert.LessOrEqual(t, len(nftComment(nftPostrtg, a, 5)), 128)
}

func TestNewOptions(t *testing.T) {
	t.Parallel()
	_, err := New(Options{})
	assert.ErrorContains(t, err, "NS is required")
}
