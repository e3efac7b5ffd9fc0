package cni

import (
	"encoding/json"
	"net/netip"
	"testing"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	flannel "github.com/flannelkit/flannel"
)

// upstreamFlannel is the flannel entry of upstream's conflist as libcni
// hands it to the plugin (name and cniVersion injected from the list).
const upstreamFlannel = `{"cniVersion":"0.3.1","name":"cbr0","type":"flannel","delegate":{"hairpinMode":true,"isDefaultGateway":true}}`

func sampleEnv() flannel.SubnetEnv {
	return flannel.SubnetEnv{
		Network: netip.MustParsePrefix("10.244.0.0/16"), Subnet: netip.MustParsePrefix("10.244.3.1/24"),
		MTU: 1450, IPMasq: true,
	}
}

func render(t *testing.T, p *Plugin, conf string, env flannel.SubnetEnv) string {
	t.Helper()
	n, err := p.ParseNetConf([]byte(conf))
	require.NoError(t, err)
	b, err := json.Marshal(DelegateConf(n, env))
	require.NoError(t, err)
	return string(b)
}

func TestDelegateConf(t *testing.T) {
	dual := sampleEnv()
	dual.IPv6Network = netip.MustParsePrefix("fd00:10:244::/56")
	dual.IPv6Subnet = netip.MustParsePrefix("fd00:10:244:3::1/64")
	dual.IPMasq = false
	for _, tc := range []struct {
		name, conf string
		env        flannel.SubnetEnv
		want       string
	}{{
		name: "upstream conflist",
		conf: upstreamFlannel,
		env:  sampleEnv(),
		want: `{"cniVersion":"0.3.1","hairpinMode":true,"ipMasq":false,"ipam":{"ranges":[[{"subnet":"10.244.3.0/24"}]],"routes":[{"dst":"10.244.0.0/16"}],"type":"host-local"},"isDefaultGateway":true,"isGateway":true,"mtu":1450,"name":"cbr0","type":"bridge"}`,
	}, {
		name: "dual-stack: two range sets and two routes; no masquerade by flannel means the bridge masquerades",
		conf: upstreamFlannel,
		env:  dual,
		want: `{"cniVersion":"0.3.1","hairpinMode":true,"ipMasq":true,"ipam":{"ranges":[[{"subnet":"10.244.3.0/24"}],[{"subnet":"fd00:10:244:3::/64"}]],"routes":[{"dst":"10.244.0.0/16"},{"dst":"fd00:10:244::/56"}],"type":"host-local"},"isDefaultGateway":true,"isGateway":true,"mtu":1450,"name":"cbr0","type":"bridge"}`,
	}, {
		name: "config wins over subnet.env; ipam overrides merged; given routes first",
		conf: `{"cniVersion":"1.0.0","name":"n","type":"flannel","delegate":{"mtu":1400,"ipMasq":true,"isGateway":false},
			"ipam":{"type":"host-local","dataDir":"/x","routes":[{"dst":"192.168.0.0/16"}]},"runtimeConfig":{"portMappings":[{"hostPort":80}]}}`,
		env:  sampleEnv(),
		want: `{"cniVersion":"1.0.0","ipMasq":true,"ipam":{"dataDir":"/x","ranges":[[{"subnet":"10.244.3.0/24"}]],"routes":[{"dst":"192.168.0.0/16"},{"dst":"10.244.0.0/16"}],"type":"host-local"},"isGateway":false,"mtu":1400,"name":"n","runtimeConfig":{"portMappings":[{"hostPort":80}]},"type":"bridge"}`,
	}, {
		name: "another delegate gets no isGateway",
		conf: `{"cniVersion":"0.4.0","name":"n","type":"flannel","delegate":{"type":"ipvlan","master":"eth0"},"ipam":{"type":"static"}}`,
		env:  sampleEnv(),
		want: `{"cniVersion":"0.4.0","ipMasq":false,"ipam":{"ranges":[[{"subnet":"10.244.3.0/24"}]],"routes":[{"dst":"10.244.0.0/16"}],"type":"static"},"master":"eth0","mtu":1450,"name":"n","type":"ipvlan"}`,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			assert.JSONEq(t, tc.want, render(t, &Plugin{}, tc.conf, tc.env))
		})
	}
}

func TestParseNetConfDefaults(t *testing.T) {
	n, err := (&Plugin{}).ParseNetConf([]byte(upstreamFlannel))
	require.NoError(t, err)
	assert.Equal(t, DefaultSubnetFile, n.SubnetFile)
	assert.Equal(t, DefaultDataDir, n.DataDir)
	n, err = (&Plugin{SubnetFile: "/a", DataDir: "/b"}).ParseNetConf([]byte(upstreamFlannel))
	require.NoError(t, err)
	assert.Equal(t, "/a", n.SubnetFile, "an embedder's default")
	assert.Equal(t, "/b", n.DataDir)
	n, err = (&Plugin{SubnetFile: "/a"}).ParseNetConf([]byte(`{"name":"x","subnetFile":"/c","dataDir":"/d"}`))
	require.NoError(t, err)
	assert.Equal(t, "/c", n.SubnetFile, "the config wins")
	assert.Equal(t, "/d", n.DataDir)
}

func TestParseNetConfRejects(t *testing.T) {
	for _, tc := range []struct {
		name, conf string
		code       uint
		msg        string
	}{
		{"malformed json", `{"name":"cbr0",`, types.ErrDecodingFailure, "flannel: parse network config: unexpected end of JSON input"},
		{"delegate name", `{"name":"cbr0","delegate":{"name":"x"}}`, types.ErrInvalidNetworkConfig, "flannel: delegate.name is set: the flannel plugin fills it in"},
		{"delegate ipam", `{"name":"cbr0","delegate":{"ipam":{"type":"dhcp"}}}`, types.ErrInvalidNetworkConfig, "flannel: delegate.ipam is set"},
		{"delegate type not a string", `{"name":"cbr0","delegate":{"type":7}}`, types.ErrInvalidNetworkConfig, "flannel: delegate.type 7: must be a plugin name"},
		{"delegate type empty", `{"name":"cbr0","delegate":{"type":""}}`, types.ErrInvalidNetworkConfig, "flannel: delegate.type : must be a plugin name"},
		{"delegate not an object", `{"name":"cbr0","delegate":[1]}`, types.ErrDecodingFailure, "flannel: parse network config"},
		{"ipam type", `{"name":"cbr0","ipam":{"type":false}}`, types.ErrInvalidNetworkConfig, "flannel: ipam.type false"},
		{"delegate key in another case", `{"name":"cbr0","delegate":{"TYPE":"macvlan"}}`, types.ErrInvalidNetworkConfig, `flannel: delegate.TYPE: write "type" (keys are case-sensitive)`},
		{"ipam key in another case", `{"name":"cbr0","ipam":{"Ranges":[]}}`, types.ErrInvalidNetworkConfig, `flannel: ipam.Ranges: write "ranges"`},
		{"ipam routes", `{"name":"cbr0","ipam":{"routes":{"dst":"1.2.3.0/24"}}}`, types.ErrInvalidNetworkConfig, "flannel: ipam.routes: must be a list"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := (&Plugin{}).ParseNetConf([]byte(tc.conf))
			var te *types.Error
			require.ErrorAs(t, err, &te)
			assert.Equal(t, tc.code, te.Code)
			assert.Contains(t, te.Msg, tc.msg)
		})
	}
}

func TestStorePathRefusesEscapes(t *testing.T) {
	for _, id := range []string{"", ".", "..", "../etc/passwd", "a/b", "a\x00b"} {
		_, err := storePath("/var/lib/cni/flannel", id)
		assert.Error(t, err, "%q", id)
	}
	p, err := storePath("/d", "0123abc-x.y_z")
	require.NoError(t, err)
	assert.Equal(t, "/d/0123abc-x.y_z", p)
}

// FuzzDelegateConf: any stdin config either is refused with a CNI error or
// renders a delegate config that is valid JSON naming a type and holding
// flannel's ranges; nothing panics.
func FuzzDelegateConf(f *testing.F) {
	f.Add([]byte(upstreamFlannel))
	f.Add([]byte(`{"name":"n","delegate":{"type":"ipvlan"},"ipam":{"routes":[{"dst":"1.0.0.0/8"}],"ranges":"x"},"runtimeConfig":{"a":1}}`))
	f.Add([]byte(`{"name":"n","delegate":null,"ipam":null}`))
	f.Add([]byte(`{"name":"n","delegate":{"type":{}}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		n, err := (&Plugin{}).ParseNetConf(b)
		if err != nil {
			var te *types.Error
			require.ErrorAs(t, err, &te)
			return
		}
		out, err := json.Marshal(DelegateConf(n, sampleEnv()))
		require.NoError(t, err)
		var d struct {
			Type string `json:"type"`
			IPAM struct {
				Ranges [][]map[string]string `json:"ranges"`
			} `json:"ipam"`
		}
		require.NoError(t, json.Unmarshal(out, &d), "%s", out)
		assert.NotEmpty(t, d.Type)
		require.Len(t, d.IPAM.Ranges, 1)
		assert.Equal(t, "10.244.3.0/24", d.IPAM.Ranges[0][0]["subnet"])
	})
}
