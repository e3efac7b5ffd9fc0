package lease

import (
	"encoding/json"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func readSample(t testing.TB, name string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join("testdata", "compat", name))
	require.NoError(t, err)
	return b
}

func TestParseConfigSamples(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		file string
		want Config
	}{
		{
			name: "vxlan",
			file: "net-conf.vxlan.json",
			want: Config{
				EnableIPv4:  true,
				Network:     netip.MustParsePrefix("10.244.0.0/16"),
				SubnetLen:   24,
				SubnetMin:   netip.MustParseAddr("10.244.1.0"),
				SubnetMax:   netip.MustParseAddr("10.244.255.0"),
				BackendType: "vxlan",
				Backend:     json.RawMessage(`{"Type":"vxlan"}`),
			},
		},
		{
			name: "etcd",
			file: "net-conf.etcd.json",
			want: Config{
				EnableIPv4:  true,
				Network:     netip.MustParsePrefix("10.0.0.0/8"),
				SubnetLen:   20,
				SubnetMin:   netip.MustParseAddr("10.10.0.0"),
				SubnetMax:   netip.MustParseAddr("10.99.0.0"),
				BackendType: "host-gw",
				Backend:     json.RawMessage(`{"Type":"host-gw"}`),
			},
		},
		{
			name: "dualstack",
			file: "net-conf.dualstack.json",
			want: Config{
				EnableIPv4:    true,
				EnableIPv6:    true,
				Network:       netip.MustParsePrefix("10.42.0.0/16"),
				SubnetLen:     24,
				SubnetMin:     netip.MustParseAddr("10.42.1.0"),
				SubnetMax:     netip.MustParseAddr("10.42.255.0"),
				IPv6Network:   netip.MustParsePrefix("2001:cafe:42::/56"),
				IPv6SubnetLen: 64,
				IPv6SubnetMin: netip.MustParseAddr("2001:cafe:42:1::"),
				IPv6SubnetMax: netip.MustParseAddr("2001:cafe:42:ff::"),
				BackendType:   "vxlan",
				Backend:       json.RawMessage(`{"Type":"vxlan","VNI":1,"Port":8472,"DirectRouting":true}`),
			},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			got, err := ParseConfig(readSample(t, tt.file))
			require.NoError(t, err)
			assert.Equal(t, tt.want, got)
			assert.NoError(t, got.Validate())
		})
	}
}

func TestParseConfigEtcdSample(t *testing.T) {
	t.Parallel()
	for _, line := range strings.Split(strings.TrimSpace(string(readSample(t, "etcd-keys.tsv"))), "\n") {
		key, value, ok := strings.Cut(line, "\t")
		require.True(t, ok, line)
		if !strings.HasSuffix(key, "/config") {
			continue
		}
		c, err := ParseConfig([]byte(value))
		require.NoError(t, err)
		assert.Equal(t, netip.MustParsePrefix("10.244.0.0/16"), c.Network)
		assert.Equal(t, "vxlan", c.BackendType)
		return
	}
	t.Fatal("no config in etcd-keys.tsv")
}

func TestParseConfigDefaults(t *testing.T) {
	t.Parallel()
	p := netip.MustParsePrefix
	a := netip.MustParseAddr
	tests := []struct {
		name  string
		input string
		check func(t *testing.T, c Config)
	}{
		{"/22 gets /24", `{"Network":"10.0.0.0/22"}`, func(t *testing.T, c Config) {
			assert.Equal(t, 24, c.SubnetLen)
			assert.Equal(t, a("10.0.1.0"), c.SubnetMin)
			assert.Equal(t, a("10.0.3.0"), c.SubnetMax)
		}},
		{"/23 gets prefix+2", `{"Network":"10.0.0.0/23"}`, func(t *testing.T, c Config) {
			assert.Equal(t, 25, c.SubnetLen)
			assert.Equal(t, a("10.0.0.128"), c.SubnetMin)
			assert.Equal(t, a("10.0.1.128"), c.SubnetMax)
		}},
		{"/28 gets /30", `{"Network":"10.0.0.0/28"}`, func(t *testing.T, c Config) {
			assert.Equal(t, 30, c.SubnetLen)
			assert.Equal(t, a("10.0.0.4"), c.SubnetMin)
			assert.Equal(t, a("10.0.0.12"), c.SubnetMax)
		}},
		{"/8 gets /24", `{"Network":"10.0.0.0/8"}`, func(t *testing.T, c Config) {
			assert.Equal(t, 24, c.SubnetLen)
			assert.Equal(t, a("10.0.1.0"), c.SubnetMin)
			assert.Equal(t, a("10.255.255.0"), c.SubnetMax)
		}},
		{"/0", `{"Network":"0.0.0.0/0"}`, func(t *testing.T, c Config) {
			assert.Equal(t, 24, c.SubnetLen)
			assert.Equal(t, a("0.0.1.0"), c.SubnetMin)
			assert.Equal(t, a("255.255.255.0"), c.SubnetMax)
		}},
		{"explicit SubnetLen", `{"Network":"10.0.0.0/16","SubnetLen":20}`, func(t *testing.T, c Config) {
			assert.Equal(t, 20, c.SubnetLen)
			assert.Equal(t, a("10.0.16.0"), c.SubnetMin)
			assert.Equal(t, a("10.0.240.0"), c.SubnetMax)
		}},
		{"SubnetLen 0 means default", `{"Network":"10.0.0.0/16","SubnetLen":0}`, func(t *testing.T, c Config) {
			assert.Equal(t, 24, c.SubnetLen)
		}},
		{"null means absent", `{"Network":"10.0.0.0/16","SubnetLen":null,"SubnetMin":null,"EnableIPv4":null,"Backend":null}`, func(t *testing.T, c Config) {
			assert.True(t, c.EnableIPv4)
			assert.Equal(t, 24, c.SubnetLen)
			assert.Equal(t, a("10.0.1.0"), c.SubnetMin)
			assert.Equal(t, "vxlan", c.BackendType)
		}},
		{"explicit min and max", `{"Network":"10.0.0.0/16","SubnetMin":"10.0.0.0","SubnetMax":"10.0.0.0"}`, func(t *testing.T, c Config) {
			assert.Equal(t, a("10.0.0.0"), c.SubnetMin)
			assert.Equal(t, a("10.0.0.0"), c.SubnetMax)
		}},
		{"EnableNFTables", `{"Network":"10.0.0.0/16","EnableNFTables":true}`, func(t *testing.T, c Config) {
			assert.True(t, c.EnableNFTables)
		}},
		{"flags default", `{"Network":"10.0.0.0/16"}`, func(t *testing.T, c Config) {
			assert.True(t, c.EnableIPv4)
			assert.False(t, c.EnableIPv6)
			assert.False(t, c.EnableNFTables)
			assert.False(t, c.IPv6Network.IsValid())
			assert.Zero(t, c.IPv6SubnetLen)
		}},
		{"IPv6Network ignored unless enabled", `{"Network":"10.0.0.0/16","IPv6Network":"fd00::/48"}`, func(t *testing.T, c Config) {
			assert.False(t, c.EnableIPv6)
			assert.False(t, c.IPv6Network.IsValid())
		}},
		{"IPv6 only", `{"EnableIPv4":false,"EnableIPv6":true,"Network":"10.0.0.0/16","SubnetLen":20,"IPv6Network":"fd00:10:244::/48"}`, func(t *testing.T, c Config) {
			assert.False(t, c.EnableIPv4)
			assert.False(t, c.Network.IsValid())
			assert.Zero(t, c.SubnetLen)
			assert.False(t, c.SubnetMin.IsValid())
			assert.Equal(t, p("fd00:10:244::/48"), c.IPv6Network)
			assert.Equal(t, 64, c.IPv6SubnetLen)
			assert.Equal(t, a("fd00:10:244:1::"), c.IPv6SubnetMin)
			assert.Equal(t, a("fd00:10:244:ffff::"), c.IPv6SubnetMax)
		}},
		{"IPv6 /62 gets /64", `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/62"}`, func(t *testing.T, c Config) {
			assert.Equal(t, 64, c.IPv6SubnetLen)
			assert.Equal(t, a("fd00:0:0:1::"), c.IPv6SubnetMin)
			assert.Equal(t, a("fd00:0:0:3::"), c.IPv6SubnetMax)
		}},
		{"IPv6 /63 gets prefix+2", `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/63"}`, func(t *testing.T, c Config) {
			assert.Equal(t, 65, c.IPv6SubnetLen)
			assert.Equal(t, a("fd00::8000:0:0:0"), c.IPv6SubnetMin)
			assert.Equal(t, a("fd00:0:0:1:8000::"), c.IPv6SubnetMax)
		}},
		{"IPv6 /124 gets /126", `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/124"}`, func(t *testing.T, c Config) {
			assert.Equal(t, 126, c.IPv6SubnetLen)
			assert.Equal(t, a("fd00::4"), c.IPv6SubnetMin)
			assert.Equal(t, a("fd00::c"), c.IPv6SubnetMax)
		}},
		{"IPv6 /8 in /64s", `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/8"}`, func(t *testing.T, c Config) {
			assert.Equal(t, 64, c.IPv6SubnetLen)
			assert.Equal(t, a("fd00:0:0:1::"), c.IPv6SubnetMin)
			assert.Equal(t, a("fdff:ffff:ffff:ffff::"), c.IPv6SubnetMax)
		}},
		{"IPv6 explicit keys", `{"EnableIPv6":true,"Network":"10.0.0.0/16","IPv6Network":"fd00::/48","IPv6SubnetLen":56,"IPv6SubnetMin":"fd00:0:0:100::","IPv6SubnetMax":"fd00:0:0:200::"}`, func(t *testing.T, c Config) {
			assert.Equal(t, 56, c.IPv6SubnetLen)
			assert.Equal(t, a("fd00:0:0:100::"), c.IPv6SubnetMin)
			assert.Equal(t, a("fd00:0:0:200::"), c.IPv6SubnetMax)
		}},
		{"IPv6SubnetLen 63 bits of subnets", `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"::/1","IPv6SubnetLen":64}`, func(t *testing.T, c Config) {
			assert.Equal(t, a("7fff:ffff:ffff:ffff::"), c.IPv6SubnetMax)
		}},
		{"Backend absent", `{"Network":"10.0.0.0/16"}`, func(t *testing.T, c Config) {
			assert.Equal(t, "vxlan", c.BackendType)
			assert.JSONEq(t, `{"Type":"vxlan"}`, string(c.Backend))
		}},
		{"Backend without Type", `{"Network":"10.0.0.0/16","Backend":{"VNI":4}}`, func(t *testing.T, c Config) {
			assert.Equal(t, "vxlan", c.BackendType)
			assert.Equal(t, `{"VNI":4}`, string(c.Backend))
		}},
		{"Backend kept and compacted", "{\"Network\":\"10.0.0.0/16\",\"Backend\":{ \"Type\" : \"ipsec\",\n \"PSK\": \"<x>&\" }}", func(t *testing.T, c Config) {
			assert.Equal(t, "ipsec", c.BackendType)
			assert.Equal(t, `{"Type":"ipsec","PSK":"<x>&"}`, string(c.Backend))
		}},
		{"unknown keys ignored", `{"Network":"10.0.0.0/16","Frobnicate":[1,2],"network_x":"x"}`, func(t *testing.T, c Config) {
			assert.Equal(t, p("10.0.0.0/16"), c.Network)
		}},
		{"keys match case-insensitively", `{"network":"10.0.0.0/16","SUBNETLEN":20,"enableipv6":true,"ipv6network":"fd00::/48","backend":{"Type":"host-gw"}}`, func(t *testing.T, c Config) {
			assert.Equal(t, p("10.0.0.0/16"), c.Network)
			assert.Equal(t, 20, c.SubnetLen)
			assert.True(t, c.EnableIPv6)
			assert.Equal(t, p("fd00::/48"), c.IPv6Network)
			assert.Equal(t, "host-gw", c.BackendType)
		}},
		{"surrounding whitespace", " \n{\"Network\":\"10.0.0.0/16\"}\n ", func(t *testing.T, c Config) {
			assert.Equal(t, p("10.0.0.0/16"), c.Network)
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c, err := ParseConfig([]byte(tt.input))
			require.NoError(t, err)
			require.NoError(t, c.Validate())
			tt.check(t, c)
		})
	}
}

func TestParseConfigErrors(t *testing.T) {
	t.Parallel()
	const v6only = `"EnableIPv4":false,"EnableIPv6":true,`
	tests := []struct {
		name  string
		input string
		key   string // "" = the document
		want  string // also in the message
	}{
		{"empty", ``, "", "not a JSON object"},
		{"null", `null`, "", "not a JSON object"},
		{"array", `[]`, "", "not a JSON object"},
		{"string", `"x"`, "", "not a JSON object"},
		{"truncated", `{"Network":"10.0.0.0/16"`, "", "malformed JSON"},
		{"trailing garbage", `{"Network":"10.0.0.0/16"} x`, "", "malformed JSON"},
		{"two objects", `{"Network":"10.0.0.0/16"}{}`, "", "malformed JSON"},

		{"Network missing", `{}`, "Network", "missing"},
		{"Network given in two cases", `{"Network":"10.0.0.0/16","network":"10.1.0.0/16"}`, "Network", `given twice, as "Network" and "network"`},
		{"Network lower case is Network", `{"network":"10.0.0.0/33"}`, "Network", `"10.0.0.0/33"`},
		{"Network bad CIDR", `{"Network":"10.0.0.0/33"}`, "Network", `"10.0.0.0/33"`},
		{"Network no length", `{"Network":"10.0.0.0"}`, "Network", `"10.0.0.0"`},
		{"Network garbage", `{"Network":"foo"}`, "Network", `"foo"`},
		{"Network number", `{"Network":10}`, "Network", "want a string"},
		{"Network object", `{"Network":{}}`, "Network", "want a string"},
		{"Network IPv6", `{"Network":"fd00::/48"}`, "Network", "not an IPv4"},
		{"Network IPv4-mapped", `{"Network":"::ffff:10.0.0.0/104"}`, "Network", "not an IPv4"},
		{"Network host bits", `{"Network":"10.244.1.0/16"}`, "Network", "host bits"},
		{"Network too small", `{"Network":"10.0.0.0/29"}`, "Network", "too small"},
		{"Network bad in disabled family", `{` + v6only + `"IPv6Network":"fd00::/48","Network":"garbage"}`, "Network", `"garbage"`},

		{"SubnetLen string", `{"Network":"10.0.0.0/16","SubnetLen":"24"}`, "SubnetLen", `"24"`},
		{"SubnetLen float", `{"Network":"10.0.0.0/16","SubnetLen":24.0}`, "SubnetLen", "24.0"},
		{"SubnetLen exponent", `{"Network":"10.0.0.0/16","SubnetLen":2.4e1}`, "SubnetLen", "want an integer"},
		{"SubnetLen bool", `{"Network":"10.0.0.0/16","SubnetLen":true}`, "SubnetLen", "want an integer"},
		{"SubnetLen huge", `{"Network":"10.0.0.0/16","SubnetLen":99999999999999999999999}`, "SubnetLen", "want an integer"},
		{"SubnetLen 31", `{"Network":"10.0.0.0/16","SubnetLen":31}`, "SubnetLen", "31"},
		{"SubnetLen 32", `{"Network":"10.0.0.0/16","SubnetLen":32}`, "SubnetLen", "between 18 and 30"},
		{"SubnetLen too short", `{"Network":"10.0.0.0/16","SubnetLen":17}`, "SubnetLen", "between 18 and 30"},
		{"SubnetLen equals network", `{"Network":"10.0.0.0/16","SubnetLen":16}`, "SubnetLen", "16"},
		{"SubnetLen negative", `{"Network":"10.0.0.0/16","SubnetLen":-24}`, "SubnetLen", "-24"},

		{"SubnetMin unaligned", `{"Network":"10.0.0.0/16","SubnetMin":"10.0.1.1"}`, "SubnetMin", "not aligned"},
		{"SubnetMin outside", `{"Network":"10.0.0.0/16","SubnetMin":"10.1.0.0"}`, "SubnetMin", "outside"},
		{"SubnetMin IPv6", `{"Network":"10.0.0.0/16","SubnetMin":"fd00::"}`, "SubnetMin", "not an IPv4"},
		{"SubnetMin garbage", `{"Network":"10.0.0.0/16","SubnetMin":"x"}`, "SubnetMin", `"x"`},
		{"SubnetMin number", `{"Network":"10.0.0.0/16","SubnetMin":5}`, "SubnetMin", "want a string"},
		{"SubnetMin empty", `{"Network":"10.0.0.0/16","SubnetMin":""}`, "SubnetMin", `""`},
		{"SubnetMin above SubnetMax", `{"Network":"10.0.0.0/16","SubnetMin":"10.0.9.0","SubnetMax":"10.0.8.0"}`, "SubnetMin", "greater than SubnetMax"},
		{"SubnetMax unaligned", `{"Network":"10.0.0.0/16","SubnetMax":"10.0.8.128"}`, "SubnetMax", "not aligned"},
		{"SubnetMax outside", `{"Network":"10.0.0.0/16","SubnetMax":"10.1.0.0"}`, "SubnetMax", "outside"},
		{"SubnetMax below default min", `{"Network":"10.0.0.0/16","SubnetMax":"10.0.0.0"}`, "SubnetMin", "greater than SubnetMax"},

		{"EnableIPv6 without IPv6Network", `{"Network":"10.0.0.0/16","EnableIPv6":true}`, "IPv6Network", "missing"},
		{"IPv6Network IPv4", `{` + v6only + `"IPv6Network":"10.0.0.0/8"}`, "IPv6Network", "not an IPv6"},
		{"IPv6Network IPv4-mapped", `{` + v6only + `"IPv6Network":"::ffff:0:0/96"}`, "IPv6Network", "IPv4-mapped"},
		{"IPv6Network host bits", `{` + v6only + `"IPv6Network":"fd00::1/48"}`, "IPv6Network", "host bits"},
		{"IPv6Network too small", `{` + v6only + `"IPv6Network":"fd00::/125"}`, "IPv6Network", "too small"},
		{"IPv6Network garbage", `{` + v6only + `"IPv6Network":"fd00::/129"}`, "IPv6Network", `"fd00::/129"`},
		{"IPv6 whole space in /64s", `{` + v6only + `"IPv6Network":"::/0"}`, "IPv6SubnetLen", "2^63"},
		{"IPv6SubnetLen 127", `{` + v6only + `"IPv6Network":"fd00::/48","IPv6SubnetLen":127}`, "IPv6SubnetLen", "between 50 and 126"},
		{"IPv6SubnetLen too short", `{` + v6only + `"IPv6Network":"fd00::/48","IPv6SubnetLen":49}`, "IPv6SubnetLen", "49"},
		{"IPv6SubnetLen string", `{` + v6only + `"IPv6Network":"fd00::/48","IPv6SubnetLen":"64"}`, "IPv6SubnetLen", `"64"`},
		{"IPv6SubnetLen too many subnets", `{` + v6only + `"IPv6Network":"fd00::/8","IPv6SubnetLen":72}`, "IPv6SubnetLen", "2^63"},
		{"IPv6SubnetMin unaligned", `{` + v6only + `"IPv6Network":"fd00::/48","IPv6SubnetMin":"fd00:0:0:1::1"}`, "IPv6SubnetMin", "not aligned"},
		{"IPv6SubnetMin outside", `{` + v6only + `"IPv6Network":"fd00::/48","IPv6SubnetMin":"fd01::"}`, "IPv6SubnetMin", "outside"},
		{"IPv6SubnetMin IPv4", `{` + v6only + `"IPv6Network":"fd00::/48","IPv6SubnetMin":"10.0.0.0"}`, "IPv6SubnetMin", "not an IPv6"},
		{"IPv6SubnetMin zone", `{` + v6only + `"IPv6Network":"fe80::/48","IPv6SubnetMin":"fe80:0:0:1::%eth0"}`, "IPv6SubnetMin", "zone"},
		{"IPv6SubnetMax outside", `{` + v6only + `"IPv6Network":"fd00::/48","IPv6SubnetMax":"fd00:1::"}`, "IPv6SubnetMax", "outside"},
		{"IPv6SubnetMin above IPv6SubnetMax", `{` + v6only + `"IPv6Network":"fd00::/48","IPv6SubnetMin":"fd00:0:0:9::","IPv6SubnetMax":"fd00:0:0:8::"}`, "IPv6SubnetMin", "greater than IPv6SubnetMax"},

		{"EnableIPv4 string", `{"Network":"10.0.0.0/16","EnableIPv4":"true"}`, "EnableIPv4", `"true"`},
		{"EnableIPv6 number", `{"Network":"10.0.0.0/16","EnableIPv6":1}`, "EnableIPv6", "want true or false"},
		{"EnableNFTables string", `{"Network":"10.0.0.0/16","EnableNFTables":"yes"}`, "EnableNFTables", `"yes"`},
		{"both families disabled", `{"EnableIPv4":false,"Network":"10.0.0.0/16"}`, "EnableIPv4", "EnableIPv6"},
		{"IPv4 enabled without Network", `{"EnableIPv6":true,"IPv6Network":"fd00::/48"}`, "Network", "missing"},

		{"Backend string", `{"Network":"10.0.0.0/16","Backend":"vxlan"}`, "Backend", "got a string"},
		{"Backend array", `{"Network":"10.0.0.0/16","Backend":[]}`, "Backend", "want a JSON object"},
		{"Backend number", `{"Network":"10.0.0.0/16","Backend":5}`, "Backend", "got a number"},
		{"Backend bool", `{"Network":"10.0.0.0/16","Backend":true}`, "Backend", "got a boolean"},
		{"Backend.Type number", `{"Network":"10.0.0.0/16","Backend":{"Type":5}}`, "Backend.Type", "want a string"},
		{"Backend.Type object", `{"Network":"10.0.0.0/16","Backend":{"Type":{}}}`, "Backend.Type", "want a string"},
		{"Backend.Type empty", `{"Network":"10.0.0.0/16","Backend":{"Type":""}}`, "Backend.Type", "empty"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			c, err := ParseConfig([]byte(tt.input))
			require.Error(t, err, "parsed as %+v", c)
			assert.ErrorIs(t, err, ErrInvalidConfig)
			var ce *ConfigError
			require.ErrorAs(t, err, &ce)
			assert.Equal(t, tt.key, ce.Key, err.Error())
			assert.Contains(t, err.Error(), tt.key)
			assert.Contains(t, err.Error(), tt.want)
			assert.Equal(t, Config{}, c)
		})
	}
}

func TestParseConfigErrorWrapsJSONError(t *testing.T) {
	t.Parallel()
	_, err := ParseConfig([]byte(`{"Network":`))
	var se *json.SyntaxError
	assert.ErrorAs(t, err, &se)
	assert.ErrorIs(t, err, ErrInvalidConfig)
}

func TestConfigErrorQuotesLongValuesShortly(t *testing.T) {
	t.Parallel()
	_, err := ParseConfig([]byte(`{"Network":"` + strings.Repeat("1", 1000) + `"}`))
	require.Error(t, err)
	assert.Less(t, len(err.Error()), 300)
}

func TestConfigJSONRoundTrip(t *testing.T) {
	t.Parallel()
	inputs := map[string]string{
		"vxlan":       string(readSample(t, "net-conf.vxlan.json")),
		"etcd":        string(readSample(t, "net-conf.etcd.json")),
		"dualstack":   string(readSample(t, "net-conf.dualstack.json")),
		"ipv6 only":   `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00::/48","EnableNFTables":true}`,
		"no type":     `{"Network":"10.0.0.0/16","Backend":{"VNI":4}}`,
		"html":        `{"Network":"10.0.0.0/16","Backend":{"Type":"ipsec","PSK":"<a&b>"}}`,
		"max subnets": `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"::/1","IPv6SubnetLen":64}`,
	}
	for name, in := range inputs {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			c, err := ParseConfig([]byte(in))
			require.NoError(t, err)
			out, err := c.JSON()
			require.NoError(t, err)
			back, err := ParseConfig(out)
			require.NoError(t, err, string(out))
			assert.Equal(t, c, back, string(out))
			assert.True(t, c.Equal(back))

			// Through encoding/json, as a field of something else.
			type doc struct {
				Config Config
			}
			b, err := json.Marshal(doc{c})
			require.NoError(t, err)
			var d doc
			require.NoError(t, json.Unmarshal(b, &d))
			assert.True(t, c.Equal(d.Config), string(b))
		})
	}
}

func TestConfigMarshalJSON(t *testing.T) {
	t.Parallel()
	c, err := ParseConfig(readSample(t, "net-conf.vxlan.json"))
	require.NoError(t, err)
	b, err := c.MarshalJSON()
	require.NoError(t, err)
	assert.Equal(t, `{"Network":"10.244.0.0/16","SubnetLen":24,"SubnetMin":"10.244.1.0","SubnetMax":"10.244.255.0","EnableIPv4":true,"EnableIPv6":false,"Backend":{"Type":"vxlan"}}`, string(b))

	// Without a Backend object, one is written from BackendType.
	c.Backend = nil
	c.BackendType = "host-gw"
	b, err = c.MarshalJSON()
	require.NoError(t, err)
	assert.Contains(t, string(b), `"Backend":{"Type":"host-gw"}`)
}

func TestConfigUnmarshalJSON(t *testing.T) {
	t.Parallel()
	var c Config
	require.NoError(t, json.Unmarshal([]byte(`null`), &c))
	assert.Equal(t, Config{}, c)
	require.NoError(t, json.Unmarshal(readSample(t, "net-conf.vxlan.json"), &c))
	assert.Equal(t, 24, c.SubnetLen)
	err := json.Unmarshal([]byte(`{"Network":"10.0.0.0/16","SubnetLen":"x"}`), &c)
	assert.ErrorIs(t, err, ErrInvalidConfig)
	assert.Contains(t, err.Error(), "SubnetLen")
}

func TestConfigErrorUnwrap(t *testing.T) {
	t.Parallel()
	e := &ConfigError{Key: "SubnetLen", Value: "31", Reason: "too long"}
	assert.Equal(t, "invalid network config: SubnetLen 31: too long", e.Error())
	assert.ErrorIs(t, e, ErrInvalidConfig)
	inner := errors.New("inner")
	e.Err = inner
	assert.ErrorIs(t, e, inner)
	assert.ErrorIs(t, e, ErrInvalidConfig)
	assert.Equal(t, "invalid network config: document: x", (&ConfigError{Reason: "document: x"}).Error())
}

// BenchmarkParseKey parses a dual-stack key, as every etcd listing does
// for every key.
func BenchmarkParseKey(b *testing.B) {
	b.ReportAllocs()
	for b.Loop() {
		if _, _, err := ParseKey("10.244.3.0-24&fd00:10:244:3::-64"); err != nil {
			b.Fatal(err)
		}
	}
}
