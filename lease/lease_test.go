package lease

import (
	"encoding/json"
	"net/netip"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// etcdSample is one line of testdata/compat/etcd-keys.tsv.
type etcdSample struct{ key, value string }

func etcdSamples(t *testing.T) (config string, subnets []etcdSample) {
	t.Helper()
	for _, line := range strings.Split(strings.TrimSpace(string(readSample(t, "etcd-keys.tsv"))), "\n") {
		key, value, ok := strings.Cut(line, "\t")
		require.True(t, ok, line)
		if strings.HasSuffix(key, "/config") {
			config = value
			continue
		}
		name, ok := strings.CutPrefix(key, "/coreos.com/network/subnets/")
		require.True(t, ok, key)
		subnets = append(subnets, etcdSample{name, value})
	}
	require.NotEmpty(t, config)
	require.Len(t, subnets, 3)
	return config, subnets
}

func TestParseKeyUpstreamSamples(t *testing.T) {
	t.Parallel()
	_, samples := etcdSamples(t)
	want := map[string][2]string{
		"10.244.3.0-24":                    {"10.244.3.0/24", ""},
		"10.244.7.0-24":                    {"10.244.7.0/24", ""},
		"10.42.1.0-24&2001:cafe:42:1::-64": {"10.42.1.0/24", "2001:cafe:42:1::/64"},
	}
	for _, s := range samples {
		t.Run(s.key, func(t *testing.T) {
			t.Parallel()
			v4, v6, err := ParseKey(s.key)
			require.NoError(t, err)
			w, ok := want[s.key]
			require.True(t, ok)
			assert.Equal(t, w[0], v4.String())
			if w[1] == "" {
				assert.False(t, v6.IsValid())
			} else {
				assert.Equal(t, w[1], v6.String())
			}
			assert.Equal(t, s.key, Lease{Subnet: v4, IPv6Subnet: v6}.Key(), "round trip")
		})
	}
}

func TestKeyRoundTrip(t *testing.T) {
	t.Parallel()
	p := netip.MustParsePrefix
	tests := []struct {
		name string
		l    Lease
		key  string
	}{
		{"v4", Lease{Subnet: p("10.244.3.0/24")}, "10.244.3.0-24"},
		{"v4 /30", Lease{Subnet: p("192.168.0.4/30")}, "192.168.0.4-30"},
		{"dual", Lease{Subnet: p("10.42.1.0/24"), IPv6Subnet: p("2001:cafe:42:1::/64")}, "10.42.1.0-24&2001:cafe:42:1::-64"},
		{"v6 only", Lease{IPv6Subnet: p("fd00:10:244:3::/64")}, "0.0.0.0-0&fd00:10:244:3::-64"},
		{"v6 full", Lease{Subnet: p("10.0.0.0/30"), IPv6Subnet: p("fd00:1:2:3:4:5:6:0/112")}, "10.0.0.0-30&fd00:1:2:3:4:5:6:0-112"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			assert.Equal(t, tt.key, tt.l.Key())
			v4, v6, err := ParseKey(tt.key)
			require.NoError(t, err)
			assert.True(t, tt.l.SameSubnets(Lease{Subnet: v4, IPv6Subnet: v6}))
		})
	}
}

func TestParseKeyUpperCaseIPv6(t *testing.T) {
	t.Parallel()
	_, v6, err := ParseKey("10.0.0.0-24&FD00::-64")
	require.NoError(t, err)
	assert.Equal(t, netip.MustParsePrefix("fd00::/64"), v6)
}

func TestParseKeyErrors(t *testing.T) {
	t.Parallel()
	for _, key := range []string{
		"",
		"foo",
		"10.244.3.0/24",
		"10.244.3.0-",
		"10.244.3.0-33",
		"10.244.3.1-24",
		"256.0.0.0-8",
		"010.244.3.0-24",
		"10.244.3-24",
		"10.244.3.0-24&",
		"10.244.3.0-24&zz::-64",
		"10.244.3.0-24&fd00::-129",
		"10.244.3.0-24&fd00::1-64",
		"10.244.3.0-24&fd00::-64x",
		"x10.244.3.0-24",
		"0.0.0.0-0",
		"10.244.3.0-99999999999999999999",
		"/coreos.com/network/subnets/10.244.3.0-24",
	} {
		t.Run(key, func(t *testing.T) {
			t.Parallel()
			v4, v6, err := ParseKey(key)
			require.Error(t, err, "%s %s", v4, v6)
			assert.Contains(t, err.Error(), key)
			assert.False(t, v4.IsValid())
			assert.False(t, v6.IsValid())
		})
	}
}

func TestAttrsUpstreamSamples(t *testing.T) {
	t.Parallel()
	_, samples := etcdSamples(t)
	// Upstream's current writer always emits PublicIPv6; a value written by
	// an older one without it comes back with "PublicIPv6":null.
	want := map[string]string{
		"10.244.7.0-24": `{"PublicIP":"192.168.1.12","PublicIPv6":null,"BackendType":"host-gw"}`,
	}
	for _, s := range samples {
		t.Run(s.key, func(t *testing.T) {
			t.Parallel()
			var a Attrs
			require.NoError(t, json.Unmarshal([]byte(s.value), &a))
			assert.True(t, a.PublicIP.Is4())
			b, err := json.Marshal(a)
			require.NoError(t, err)
			w, ok := want[s.key]
			if !ok {
				w = s.value
			}
			assert.Equal(t, w, string(b))

			var back Attrs
			require.NoError(t, json.Unmarshal(b, &back))
			assert.True(t, a.Equal(back))
		})
	}
}

func TestAttrsValues(t *testing.T) {
	t.Parallel()
	_, samples := etcdSamples(t)
	var dual Attrs
	for _, s := range samples {
		if strings.Contains(s.key, "&") {
			require.NoError(t, json.Unmarshal([]byte(s.value), &dual))
		}
	}
	assert.Equal(t, netip.MustParseAddr("192.168.1.13"), dual.PublicIP)
	assert.Equal(t, netip.MustParseAddr("2001:db8::13"), dual.PublicIPv6)
	assert.Equal(t, "vxlan", dual.BackendType)
	assert.JSONEq(t, `{"VNI":1,"VtepMAC":"9e:01:22:33:44:55"}`, string(dual.BackendData))
	assert.JSONEq(t, `{"VNI":1,"VtepMAC":"9e:01:22:33:44:66"}`, string(dual.BackendV6Data))

	// An IPv6-only node publishes PublicIP "0.0.0.0"; it reads back absent.
	v6only := Attrs{PublicIPv6: netip.MustParseAddr("fd00::1"), BackendType: "vxlan"}
	b, err := json.Marshal(v6only)
	require.NoError(t, err)
	assert.Equal(t, `{"PublicIP":"0.0.0.0","PublicIPv6":"fd00::1","BackendType":"vxlan"}`, string(b))
	var back Attrs
	require.NoError(t, json.Unmarshal(b, &back))
	assert.False(t, back.PublicIP.IsValid())
	assert.True(t, v6only.Equal(back))
}

func TestAttrsErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name  string
		input string
		field string
	}{
		{"PublicIP garbage", `{"PublicIP":"nope","BackendType":"vxlan"}`, "PublicIP"},
		{"PublicIP IPv6", `{"PublicIP":"fd00::1"}`, "PublicIP"},
		{"PublicIP mapped", `{"PublicIP":"::ffff:1.2.3.4"}`, "PublicIP"},
		{"PublicIPv6 IPv4", `{"PublicIP":"1.2.3.4","PublicIPv6":"1.2.3.4"}`, "PublicIPv6"},
		{"PublicIPv6 mapped", `{"PublicIP":"1.2.3.4","PublicIPv6":"::ffff:1.2.3.4"}`, "PublicIPv6"},
		{"PublicIPv6 garbage", `{"PublicIP":"1.2.3.4","PublicIPv6":"x"}`, "PublicIPv6"},
		{"PublicIP number", `{"PublicIP":5}`, "PublicIP"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			var a Attrs
			err := json.Unmarshal([]byte(tt.input), &a)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tt.field)
		})
	}

	_, err := json.Marshal(Attrs{PublicIP: netip.MustParseAddr("fd00::1")})
	assert.ErrorContains(t, err, "PublicIP")
	_, err = json.Marshal(Attrs{PublicIPv6: netip.MustParseAddr("1.2.3.4")})
	assert.ErrorContains(t, err, "PublicIPv6")
	_, err = json.Marshal(Attrs{BackendData: json.RawMessage(`{`)})
	assert.ErrorContains(t, err, "BackendData")
}
