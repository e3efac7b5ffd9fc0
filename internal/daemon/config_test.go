package daemon

import (
	"bytes"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/lease"
)

func envOf(m map[string]string) func(string) string {
	return func(k string) string { return m[k] }
}

func TestParseDefaults(t *testing.T) {
	t.Parallel()
	c, err := Parse(nil, envOf(nil), io.Discard)
	require.NoError(t, err)
	assert.Equal(t, []string{"http://127.0.0.1:4001", "http://127.0.0.1:2379"}, c.EtcdEndpoints)
	assert.Equal(t, "/coreos.com/network", c.EtcdPrefix)
	assert.Equal(t, "/run/flannel/subnet.env", c.SubnetFile)
	assert.Equal(t, "/etc/kube-flannel/net-conf.json", c.NetConfigPath)
	assert.Equal(t, "flannel.alpha.coreos.com", c.KubeAnnotationPrefix)
	assert.Equal(t, 60*time.Minute, c.SubnetLeaseRenewMargin)
	assert.Equal(t, 5*time.Second, c.IPTablesResync)
	assert.True(t, c.IPTablesForwardRules)
	assert.True(t, c.SetNodeNetworkUnavailable)
	assert.Equal(t, "/run/flannel/wgkey", c.WireguardKeyFile, "upstream's wireguard key file")
	assert.False(t, c.IPMasq)
	assert.True(t, c.IPMasqIPv6, "both families, as upstream")
	assert.Equal(t, netip.IPv4Unspecified(), c.HealthzIP)
	assert.Equal(t, 0, c.HealthzPort)
	assert.Equal(t, "text", c.LogFormat)
}

// TestParseWireguardKeyFile: WIREGUARD_KEY_FILE moves the key file, as
// upstream reads it (no FLANNELD_ prefix, no flag).
func TestParseWireguardKeyFile(t *testing.T) {
	t.Parallel()
	c, err := Parse(nil, envOf(map[string]string{"WIREGUARD_KEY_FILE": "/var/lib/flannel/wgkey"}), io.Discard)
	require.NoError(t, err)
	assert.Equal(t, "/var/lib/flannel/wgkey", c.WireguardKeyFile)
	r, err := Registry(c)
	require.NoError(t, err)
	assert.Contains(t, r.Types(), "wireguard")
}

// TestParseEachSetting sets every setting once as a flag and once as its
// FLANNELD_* variable and checks the parsed field.
func TestParseEachSetting(t *testing.T) {
	t.Parallel()
	tests := []struct {
		flag, value string
		extraEnv    map[string]string
		check       func(t *testing.T, c Config)
	}{
		{"etcd-endpoints", "https://10.0.0.1:2379,https://10.0.0.2:2379", nil, func(t *testing.T, c Config) {
			assert.Equal(t, []string{"https://10.0.0.1:2379", "https://10.0.0.2:2379"}, c.EtcdEndpoints)
		}},
		{"etcd-prefix", "/my/net", nil, func(t *testing.T, c Config) { assert.Equal(t, "/my/net", c.EtcdPrefix) }},
		{"etcd-keyfile", "/k.pem", map[string]string{"FLANNELD_ETCD_CERTFILE": "/c.pem"}, func(t *testing.T, c Config) { assert.Equal(t, "/k.pem", c.EtcdKeyFile) }},
		{"etcd-certfile", "/c.pem", map[string]string{"FLANNELD_ETCD_KEYFILE": "/k.pem"}, func(t *testing.T, c Config) { assert.Equal(t, "/c.pem", c.EtcdCertFile) }},
		{"etcd-cafile", "/ca.pem", nil, func(t *testing.T, c Config) { assert.Equal(t, "/ca.pem", c.EtcdCAFile) }},
		{"etcd-username", "flannel", nil, func(t *testing.T, c Config) { assert.Equal(t, "flannel", c.EtcdUsername) }},
		{"etcd-password", "s3cret", nil, func(t *testing.T, c Config) { assert.Equal(t, "s3cret", c.EtcdPassword) }},
		{"kube-subnet-mgr", "true", map[string]string{"NODE_NAME": "n1"}, func(t *testing.T, c Config) {
			assert.True(t, c.KubeSubnetMgr)
			assert.Equal(t, "n1", c.NodeName)
		}},
		{"kube-api-url", "https://10.0.0.1:6443", map[string]string{"FLANNELD_KUBE_SUBNET_MGR": "true", "POD_NAME": "p", "POD_NAMESPACE": "kube-flannel"}, func(t *testing.T, c Config) {
			assert.Equal(t, "https://10.0.0.1:6443", c.KubeAPIURL)
			assert.Equal(t, "p", c.PodName)
			assert.Equal(t, "kube-flannel", c.PodNamespace)
		}},
		{"kubeconfig-file", "/etc/kubeconfig", nil, func(t *testing.T, c Config) { assert.Equal(t, "/etc/kubeconfig", c.KubeconfigFile) }},
		{"kube-annotation-prefix", "example.com", nil, func(t *testing.T, c Config) { assert.Equal(t, "example.com", c.KubeAnnotationPrefix) }},
		{"iface", "eth1", nil, func(t *testing.T, c Config) { assert.Equal(t, []string{"eth1"}, c.Ifaces) }},
		{"iface-regex", "^en.*", nil, func(t *testing.T, c Config) { assert.Equal(t, []string{"^en.*"}, c.IfaceRegexes) }},
		{"iface-can-reach", "192.0.2.1", nil, func(t *testing.T, c Config) { assert.Equal(t, netip.MustParseAddr("192.0.2.1"), c.IfaceCanReach) }},
		{"public-ip", "203.0.113.5", nil, func(t *testing.T, c Config) { assert.Equal(t, netip.MustParseAddr("203.0.113.5"), c.PublicIP) }},
		{"public-ipv6", "2001:db8::5", nil, func(t *testing.T, c Config) { assert.Equal(t, netip.MustParseAddr("2001:db8::5"), c.PublicIPv6) }},
		{"subnet-file", "/tmp/s.env", nil, func(t *testing.T, c Config) { assert.Equal(t, "/tmp/s.env", c.SubnetFile) }},
		{"net-config-path", "/tmp/net.json", nil, func(t *testing.T, c Config) { assert.Equal(t, "/tmp/net.json", c.NetConfigPath) }},
		{"subnet-lease-renew-margin", "30", nil, func(t *testing.T, c Config) { assert.Equal(t, 30*time.Minute, c.SubnetLeaseRenewMargin) }},
		{"ip-masq", "true", nil, func(t *testing.T, c Config) { assert.True(t, c.IPMasq) }},
		{"ip-masq-fully-random-disable", "true", nil, func(t *testing.T, c Config) { assert.True(t, c.IPMasqRandomFullyDisable) }},
		{"ip-masq-ipv6", "false", nil, func(t *testing.T, c Config) { assert.False(t, c.IPMasqIPv6) }},
		{"ip-masq-random-fully-disable", "true", nil, func(t *testing.T, c Config) { assert.True(t, c.IPMasqRandomFullyDisable) }},
		{"vmodule", "agent=2", nil, func(t *testing.T, c Config) { assert.Equal(t, 0, c.Verbosity) }},
		{"log_backtrace_at", "main.go:10", nil, func(t *testing.T, c Config) { assert.Equal(t, 0, c.Verbosity) }},
		{"iptables-resync", "17", nil, func(t *testing.T, c Config) { assert.Equal(t, 17*time.Second, c.IPTablesResync) }},
		{"iptables-forward-rules", "false", nil, func(t *testing.T, c Config) { assert.False(t, c.IPTablesForwardRules) }},
		{"ip-blackhole-route", "true", nil, func(t *testing.T, c Config) { assert.True(t, c.IPBlackholeRoute) }},
		{"healthz-ip", "127.0.0.1", nil, func(t *testing.T, c Config) { assert.Equal(t, netip.MustParseAddr("127.0.0.1"), c.HealthzIP) }},
		{"healthz-port", "8471", nil, func(t *testing.T, c Config) { assert.Equal(t, 8471, c.HealthzPort) }},
		{"set-node-network-unavailable", "false", nil, func(t *testing.T, c Config) { assert.False(t, c.SetNodeNetworkUnavailable) }},
		{"version", "true", nil, func(t *testing.T, c Config) { assert.True(t, c.Version) }},
		{"v", "2", nil, func(t *testing.T, c Config) { assert.Equal(t, 2, c.Verbosity) }},
		{"log-format", "json", nil, func(t *testing.T, c Config) { assert.Equal(t, "json", c.LogFormat) }},
		{"cleanup", "true", nil, func(t *testing.T, c Config) { assert.True(t, c.Cleanup) }},
	}
	for _, tc := range tests {
		t.Run(tc.flag, func(t *testing.T) {
			t.Parallel()
			env := map[string]string{}
			for k, v := range tc.extraEnv {
				env[k] = v
			}
			c, err := Parse([]string{"--" + tc.flag + "=" + tc.value}, envOf(env), io.Discard)
			require.NoError(t, err, "flag")
			tc.check(t, c)

			name := EnvPrefix + upperUnderscore(tc.flag)
			env[name] = tc.value
			c, err = Parse(nil, envOf(env), io.Discard)
			require.NoError(t, err, "variable %s", name)
			tc.check(t, c)
		})
	}
}

func upperUnderscore(s string) string {
	out := []byte(s)
	for i, b := range out {
		switch {
		case b == '-':
			out[i] = '_'
		case b >= 'a' && b <= 'z':
			out[i] = b - 'a' + 'A'
		}
	}
	return string(out)
}

func TestParseFlagWinsOverEnv(t *testing.T) {
	t.Parallel()
	env := envOf(map[string]string{"FLANNELD_ETCD_PREFIX": "/from/env", "FLANNELD_IFACE": "eth1,eth2", "FLANNELD_IP_MASQ": "true"})
	c, err := Parse([]string{"-etcd-prefix", "/from/flag", "--iface", "eth9"}, env, io.Discard)
	require.NoError(t, err)
	assert.Equal(t, "/from/flag", c.EtcdPrefix)
	assert.Equal(t, []string{"eth9"}, c.Ifaces)
	assert.True(t, c.IPMasq)
	c, err = Parse([]string{"--iface", "eth0", "--iface", "10.0.0.1"}, envOf(nil), io.Discard)
	require.NoError(t, err)
	assert.Equal(t, []string{"eth0", "10.0.0.1"}, c.Ifaces)
	c, err = Parse(nil, env, io.Discard)
	require.NoError(t, err)
	assert.Equal(t, []string{"eth1", "eth2"}, c.Ifaces)
}

func TestParseErrors(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		args    []string
		env     map[string]string
		wantErr string
	}{
		{"bad public ip", []string{"--public-ip", "10.0.0"}, nil, "public-ip"},
		{"v6 as public ip", []string{"--public-ip", "2001:db8::1"}, nil, "not an IPv4 address"},
		{"v4 as public ipv6", []string{"--public-ipv6", "10.0.0.1"}, nil, "not an IPv6 address"},
		{"bad can-reach", []string{"--iface-can-reach", "host"}, nil, "iface-can-reach"},
		{"bad healthz ip", []string{"--healthz-ip", "x"}, nil, "healthz-ip"},
		{"healthz port range", []string{"--healthz-port", "70000"}, nil, "-healthz-port"},
		{"negative margin", []string{"--subnet-lease-renew-margin", "-1"}, nil, "subnet-lease-renew-margin"},
		{"zero resync", []string{"--iptables-resync", "0"}, nil, "iptables-resync"},
		{"not a number", []string{"--iptables-resync", "5s"}, nil, "iptables-resync"},
		{"bad bool", []string{"--ip-masq=maybe"}, nil, "ip-masq"},
		{"bad regex", []string{"--iface-regex", "(["}, nil, "iface-regex"},
		{"bad log format", []string{"--log-format", "xml"}, nil, "log-format"},
		{"bad endpoint", []string{"--etcd-endpoints", "10.0.0.1:2379"}, nil, "etcd-endpoints"},
		{"bad endpoint port", []string{"--etcd-endpoints", "http://10.0.0.1:99999"}, nil, "etcd-endpoints"},
		{"empty endpoints", []string{"--etcd-endpoints", " , "}, nil, "no endpoint"},
		{"relative prefix", []string{"--etcd-prefix", "coreos.com"}, nil, "etcd-prefix"},
		{"cert without key", []string{"--etcd-certfile", "/c.pem"}, nil, "go together"},
		{"kube without node name", []string{"--kube-subnet-mgr"}, nil, "NODE_NAME"},
		{"kube bad url", []string{"--kube-subnet-mgr", "--kube-api-url", "::"}, map[string]string{"NODE_NAME": "n"}, "kube-api-url"},
		{"unknown flag", []string{"--no-such-flag"}, nil, "no-such-flag"},
		{"positional", []string{"extra"}, nil, "unexpected argument"},
		{"bad env value", nil, map[string]string{"FLANNELD_HEALTHZ_PORT": "eighty"}, "FLANNELD_HEALTHZ_PORT"},
		{"bad env ip", nil, map[string]string{"FLANNELD_PUBLIC_IP": "1.2.3"}, "FLANNELD_PUBLIC_IP"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := Parse(tc.args, envOf(tc.env), io.Discard)
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.wantErr)
		})
	}
}

func TestConfigNeverPrintsEtcdPassword(t *testing.T) {
	t.Parallel()
	c, err := Parse([]string{"--etcd-password=hunter2", "--etcd-username=flannel"}, envOf(nil), io.Discard)
	require.NoError(t, err)
	var buf bytes.Buffer
	slog.New(slog.NewJSONHandler(&buf, nil)).Info("config", "cfg", c)
	slog.New(slog.NewTextHandler(&buf, nil)).Info("config", "cfg", c)
	for _, s := range []string{buf.String(), c.String(), fmt.Sprintf("%v", c), fmt.Sprintf("%+v", c), fmt.Sprintf("%#v", c), fmt.Sprintf("%v", &c)} {
		assert.NotContains(t, s, "hunter2")
		assert.Contains(t, s, "flannel")
	}
	assert.Contains(t, c.String(), "EtcdPassword:"+lease.Redacted)
	assert.Equal(t, "hunter2", c.EtcdPassword, "the value itself stays usable")
}
