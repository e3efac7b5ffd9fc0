package ipconv

import (
	"net"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestPrefixFromIPNet(t *testing.T) {
	tests := []struct {
		name string
		in   *net.IPNet
		want string
		ok   bool
	}{
		{name: "ipv4", in: &net.IPNet{IP: net.IP{10, 244, 1, 0}, Mask: net.CIDRMask(24, 32)}, want: "10.244.1.0/24", ok: true},
		{name: "ipv4 host bits masked", in: &net.IPNet{IP: net.IP{10, 244, 1, 9}, Mask: net.CIDRMask(24, 32)}, want: "10.244.1.0/24", ok: true},
		{name: "ipv4 16-byte", in: &net.IPNet{IP: net.ParseIP("10.244.1.7"), Mask: net.CIDRMask(24, 32)}, want: "10.244.1.0/24", ok: true},
		{name: "ipv4 16-byte mask", in: &net.IPNet{IP: net.ParseIP("10.244.1.7"), Mask: net.CIDRMask(120, 128)}, want: "10.244.1.0/24", ok: true},
		{name: "ipv4 default", in: &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}, want: "0.0.0.0/0", ok: true},
		{name: "ipv6", in: &net.IPNet{IP: net.ParseIP("fd00:10:244:1::5"), Mask: net.CIDRMask(64, 128)}, want: "fd00:10:244:1::/64", ok: true},
		{name: "ipv6 host", in: &net.IPNet{IP: net.ParseIP("fd00::5"), Mask: net.CIDRMask(128, 128)}, want: "fd00::5/128", ok: true},
		{name: "nil", in: nil},
		{name: "bad ip", in: &net.IPNet{IP: net.IP{1, 2, 3}, Mask: net.CIDRMask(8, 32)}},
		{name: "no mask", in: &net.IPNet{IP: net.IP{10, 0, 0, 1}}},
		{name: "non-canonical mask", in: &net.IPNet{IP: net.IP{10, 0, 0, 1}, Mask: net.IPMask{255, 0, 255, 0}}},
		{name: "ipv4 16-byte mask too short", in: &net.IPNet{IP: net.ParseIP("10.0.0.1"), Mask: net.CIDRMask(64, 128)}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p, ok := PrefixFromIPNet(tc.in)
			require.Equal(t, tc.ok, ok, "ok")
			if !ok {
				assert.False(t, p.IsValid())
				return
			}
			assert.Equal(t, tc.want, p.String())
			back, ok := PrefixFromIPNet(IPNetFromPrefix(p))
			assert.True(t, ok)
			assert.Equal(t, p, back, "round trip")
		})
	}
}

func TestIPNetFromPrefix(t *testing.T) {
	n := IPNetFromPrefix(netip.MustParsePrefix("10.244.1.7/24"))
	assert.Equal(t, "10.244.1.0/24", n.String(), "masked")
	assert.Len(t, n.IP, 4, "4-byte IPv4 for netlink")
	assert.Len(t, n.Mask, 4)
	n = IPNetFromPrefix(netip.MustParsePrefix("fd00:1::5/64"))
	assert.Equal(t, "fd00:1::/64", n.String())
	assert.Len(t, n.IP, 16)
	assert.Len(t, n.Mask, 16)
}

func TestAddrConversions(t *testing.T) {
	assert.Nil(t, IPFromAddr(netip.Addr{}))
	assert.Len(t, IPFromAddr(netip.MustParseAddr("10.0.0.1")), 4)
	assert.Len(t, IPFromAddr(netip.MustParseAddr("::ffff:10.0.0.1")), 4, "mapped IPv4 unmapped")
	assert.Len(t, IPFromAddr(netip.MustParseAddr("fd00::1")), 16)
	assert.Equal(t, netip.MustParseAddr("10.0.0.1"), AddrFromIP(net.ParseIP("10.0.0.1")), "16-byte IPv4 unmapped")
	assert.Equal(t, netip.MustParseAddr("10.0.0.1"), AddrFromIP(net.IP{10, 0, 0, 1}))
	assert.Equal(t, netip.MustParseAddr("fd00::1"), AddrFromIP(net.ParseIP("fd00::1")))
	assert.False(t, AddrFromIP(nil).IsValid())
	assert.False(t, AddrFromIP(net.IP{1, 2, 3}).IsValid())
}
