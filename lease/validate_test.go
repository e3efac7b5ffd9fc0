package lease

import (
	"encoding/json"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// dualConfig is a valid dual-stack config built in code.
func dualConfig() Config {
	return Config{
		EnableIPv4:  true,
		EnableIPv6:  true,
		Network:     netip.MustParsePrefix("10.244.0.0/16"),
		IPv6Network: netip.MustParsePrefix("fd00:10:244::/56"),
	}.WithDefaults()
}

func TestWithDefaults(t *testing.T) {
	t.Parallel()
	c := dualConfig()
	require.NoError(t, c.Validate())
	assert.Equal(t, 24, c.SubnetLen)
	assert.Equal(t, netip.MustParseAddr("10.244.1.0"), c.SubnetMin)
	assert.Equal(t, netip.MustParseAddr("10.244.255.0"), c.SubnetMax)
	assert.Equal(t, 64, c.IPv6SubnetLen)
	assert.Equal(t, netip.MustParseAddr("fd00:10:244:1::"), c.IPv6SubnetMin)
	assert.Equal(t, netip.MustParseAddr("fd00:10:244:ff::"), c.IPv6SubnetMax)
	assert.Equal(t, "vxlan", c.BackendType)
	assert.JSONEq(t, `{"Type":"vxlan"}`, string(c.Backend))
	assert.Equal(t, c, c.WithDefaults(), "idempotent")

	// BackendType alone gives the Backend object; Backend alone the type.
	h := Config{EnableIPv4: true, Network: netip.MustParsePrefix("10.0.0.0/16"), BackendType: "host-gw"}.WithDefaults()
	assert.JSONEq(t, `{"Type":"host-gw"}`, string(h.Backend))
	b := Config{EnableIPv4: true, Network: netip.MustParsePrefix("10.0.0.0/16"), Backend: json.RawMessage(`{"Type":"ipsec"}`)}.WithDefaults()
	assert.Equal(t, "ipsec", b.BackendType)

	// An invalid network leaves its defaults alone.
	bad := Config{EnableIPv4: true, Network: netip.MustParsePrefix("10.0.1.0/16")}.WithDefaults()
	assert.Zero(t, bad.SubnetLen)
	assert.False(t, bad.SubnetMin.IsValid())
	assert.ErrorIs(t, bad.Validate(), ErrInvalidConfig)
}

func TestValidate(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		modify func(c *Config)
		key    string // "" = valid
	}{
		{"valid", func(c *Config) {}, ""},
		{"zero config", func(c *Config) { *c = Config{} }, "EnableIPv4"},
		{"ipv4 only", func(c *Config) {
			c.EnableIPv6, c.IPv6Network, c.IPv6SubnetLen, c.IPv6SubnetMin, c.IPv6SubnetMax = false, netip.Prefix{}, 0, netip.Addr{}, netip.Addr{}
		}, ""},
		{"ipv6 fields while disabled", func(c *Config) { c.EnableIPv6 = false }, "IPv6Network"},
		{"ipv6 length while disabled", func(c *Config) {
			c.EnableIPv6, c.IPv6Network = false, netip.Prefix{}
		}, "IPv6SubnetLen"},
		{"ipv4 min while disabled", func(c *Config) {
			c.EnableIPv4, c.Network, c.SubnetLen = false, netip.Prefix{}, 0
		}, "SubnetMin"},
		{"ipv4 max while disabled", func(c *Config) {
			c.EnableIPv4, c.Network, c.SubnetLen, c.SubnetMin = false, netip.Prefix{}, 0, netip.Addr{}
		}, "SubnetMax"},
		{"network missing", func(c *Config) { c.Network = netip.Prefix{} }, "Network"},
		{"network is ipv6", func(c *Config) { c.Network = netip.MustParsePrefix("fd00::/48") }, "Network"},
		{"network host bits", func(c *Config) { c.Network = netip.MustParsePrefix("10.244.3.0/16") }, "Network"},
		{"subnet len missing", func(c *Config) { c.SubnetLen = 0 }, "SubnetLen"},
		{"min missing", func(c *Config) { c.SubnetMin = netip.Addr{} }, "SubnetMin"},
		{"max missing", func(c *Config) { c.SubnetMax = netip.Addr{} }, "SubnetMax"},
		{"min ipv4-mapped", func(c *Config) { c.SubnetMin = netip.MustParseAddr("::ffff:10.244.1.0") }, "SubnetMin"},
		{"ipv6 min ipv4-mapped", func(c *Config) { c.IPv6SubnetMin = netip.MustParseAddr("::ffff:10.244.1.0") }, "IPv6SubnetMin"},
		{"ipv6 max is ipv4", func(c *Config) { c.IPv6SubnetMax = netip.MustParseAddr("10.244.1.0") }, "IPv6SubnetMax"},
		{"ipv6 network ipv4", func(c *Config) { c.IPv6Network = netip.MustParsePrefix("10.0.0.0/8") }, "IPv6Network"},
		{"backend type missing", func(c *Config) { c.BackendType = "" }, "Backend.Type"},
		{"backend type differs", func(c *Config) { c.BackendType = "host-gw" }, "Backend.Type"},
		{"backend without type but not vxlan", func(c *Config) {
			c.BackendType, c.Backend = "host-gw", json.RawMessage(`{"VNI":1}`)
		}, "Backend.Type"},
		{"backend without type, vxlan", func(c *Config) { c.Backend = json.RawMessage(`{"VNI":1}`) }, ""},
		{"backend absent", func(c *Config) { c.Backend = nil }, ""},
		{"backend not an object", func(c *Config) { c.Backend = json.RawMessage(`[1]`) }, "Backend"},
		{"backend invalid json", func(c *Config) { c.Backend = json.RawMessage(`{"Type":`) }, "Backend"},
		{"backend type not a string", func(c *Config) { c.Backend = json.RawMessage(`{"Type":1}`) }, "Backend.Type"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c := dualConfig()
			tt.modify(&c)
			err := c.Validate()
			if tt.key == "" {
				assert.NoError(t, err)
				return
			}
			require.Error(t, err)
			assert.ErrorIs(t, err, ErrInvalidConfig)
			var ce *ConfigError
			require.ErrorAs(t, err, &ce)
			assert.Equal(t, tt.key, ce.Key, err.Error())
		})
	}
}

func TestValidateBackendErrorHidesSecrets(t *testing.T) {
	t.Parallel()
	c := dualConfig()
	c.Backend = json.RawMessage(`{"Type":"ipsec","PSK":"s3cr3t"`)
	err := c.Validate()
	require.ErrorIs(t, err, ErrInvalidConfig)
	assert.Contains(t, err.Error(), "Backend")
	assert.NotContains(t, err.Error(), "s3cr3t")
}

func TestCheckLease(t *testing.T) {
	t.Parallel()
	p := netip.MustParsePrefix
	dual := dualConfig()
	v4 := Config{EnableIPv4: true, Network: p("10.244.0.0/16"), SubnetMin: netip.MustParseAddr("10.244.10.0"), SubnetMax: netip.MustParseAddr("10.244.20.0")}.WithDefaults()
	v6 := Config{EnableIPv6: true, IPv6Network: p("fd00::/48")}.WithDefaults()
	tests := []struct {
		name string
		c    Config
		l    Lease
		want string // "" = ok; else in the error
	}{
		{"dual ok", dual, Lease{Subnet: p("10.244.3.0/24"), IPv6Subnet: p("fd00:10:244:3::/64")}, ""},
		{"dual first and last", dual, Lease{Subnet: p("10.244.1.0/24"), IPv6Subnet: p("fd00:10:244:ff::/64")}, ""},
		{"dual missing v6", dual, Lease{Subnet: p("10.244.3.0/24")}, "no IPv6 subnet"},
		{"dual missing v4", dual, Lease{IPv6Subnet: p("fd00:10:244:3::/64")}, "no IPv4 subnet"},
		{"v4 below min", v4, Lease{Subnet: p("10.244.9.0/24")}, "outside"},
		{"v4 above max", v4, Lease{Subnet: p("10.244.21.0/24")}, "outside"},
		{"v4 min", v4, Lease{Subnet: p("10.244.10.0/24")}, ""},
		{"v4 max", v4, Lease{Subnet: p("10.244.20.0/24")}, ""},
		{"v4 first subnet is not in range", dual, Lease{Subnet: p("10.244.0.0/24"), IPv6Subnet: p("fd00:10:244:3::/64")}, "outside"},
		{"v4 other network", v4, Lease{Subnet: p("10.245.10.0/24")}, "outside"},
		{"v4 wrong length", v4, Lease{Subnet: p("10.244.10.0/25")}, "not a /24"},
		{"v4 host bits", v4, Lease{Subnet: netip.PrefixFrom(netip.MustParseAddr("10.244.10.1"), 24)}, "host bits"},
		{"v4 given ipv6", v4, Lease{Subnet: p("fd00::/24")}, "not IPv4"},
		{"v4 config, lease has v6", v4, Lease{Subnet: p("10.244.10.0/24"), IPv6Subnet: p("fd00::/64")}, "IPv6 is disabled"},
		{"v6 ok", v6, Lease{IPv6Subnet: p("fd00:0:0:1::/64")}, ""},
		{"v6 config, lease has v4", v6, Lease{Subnet: p("10.0.0.0/24"), IPv6Subnet: p("fd00:0:0:1::/64")}, "IPv4 is disabled"},
		{"v6 first subnet", v6, Lease{IPv6Subnet: p("fd00::/64")}, "outside"},
		{"v6 wrong length", v6, Lease{IPv6Subnet: p("fd00:0:0:1::/63")}, "not a /64"},
		{"v6 ipv4-mapped", v6, Lease{IPv6Subnet: p("::ffff:10.0.0.0/64")}, "not IPv6"},
		{"empty lease", v4, Lease{}, "no IPv4 subnet"},
		{"invalid config", Config{}, Lease{Subnet: p("10.0.0.0/24")}, "invalid network config"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			err := tt.c.CheckLease(tt.l)
			if tt.want == "" {
				assert.NoError(t, err)
				return
			}
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.want)
		})
	}
}
