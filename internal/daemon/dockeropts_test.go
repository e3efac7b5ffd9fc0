package daemon

import (
	"bytes"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	flannel "github.com/flannelkit/flannel"
)

func TestDockerOpts(t *testing.T) {
	t.Parallel()
	v4 := flannel.SubnetEnv{
		Network: netip.MustParsePrefix("10.1.0.0/16"), Subnet: netip.MustParsePrefix("10.1.72.1/24"),
		MTU: 1472, IPMasq: true,
	}
	dual := v4
	dual.IPv6Network = netip.MustParsePrefix("fd00:10:1::/56")
	dual.IPv6Subnet = netip.MustParsePrefix("fd00:10:1:48::1/64")
	dual.IPMasq = false
	v6only := flannel.SubnetEnv{IPv6Network: dual.IPv6Network, IPv6Subnet: dual.IPv6Subnet, MTU: 1450}
	tests := []struct {
		name    string
		env     flannel.SubnetEnv
		o       DockerOptions
		want    string
		wantErr string
	}{
		{name: "default writes both forms", env: v4, want: `DOCKER_OPT_BIP="--bip=10.1.72.1/24"
DOCKER_OPT_IPMASQ="--ip-masq=false"
DOCKER_OPT_MTU="--mtu=1472"
DOCKER_OPTS="--bip=10.1.72.1/24 --ip-masq=false --mtu=1472"
`},
		{name: "individual", env: v4, o: DockerOptions{Individual: true}, want: `DOCKER_OPT_BIP="--bip=10.1.72.1/24"
DOCKER_OPT_IPMASQ="--ip-masq=false"
DOCKER_OPT_MTU="--mtu=1472"
`},
		{name: "combined with key, no ip-masq", env: v4, o: DockerOptions{Combined: true, CombinedKey: "DOCKER_NETWORK_OPTIONS", NoIPMasq: true},
			want: "DOCKER_NETWORK_OPTIONS=\"--bip=10.1.72.1/24 --mtu=1472\"\n"},
		{name: "dual stack, flannel not masquerading", env: dual, o: DockerOptions{Combined: true},
			want: "DOCKER_OPTS=\"--bip=10.1.72.1/24 --ip-masq=true --mtu=1472 --ipv6 --fixed-cidr-v6=fd00:10:1:48::/64\"\n"},
		{name: "ipv6 only", env: v6only, wantErr: "no FLANNEL_SUBNET"},
		{name: "no mtu", env: flannel.SubnetEnv{Network: v4.Network, Subnet: v4.Subnet}, wantErr: "no FLANNEL_MTU"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got, err := DockerOpts(tc.env, tc.o)
			if tc.wantErr != "" {
				assert.ErrorContains(t, err, tc.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, string(got))
		})
	}
}

func TestDockerOptsCommand(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		require.NoError(t, os.WriteFile(p, []byte(content), 0o644))
		return p
	}
	good := write("good.env", "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:3::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n")
	bad := write("bad.env", "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/99\nFLANNEL_MTU=1450\n")

	out := filepath.Join(dir, "sub", "docker_opts.env")
	require.NoError(t, DockerOptsCommand([]string{"-f", good, "-d", out, "-c"}, io.Discard, io.Discard))
	b, err := os.ReadFile(out)
	require.NoError(t, err)
	assert.Equal(t, "DOCKER_OPTS=\"--bip=10.244.3.1/24 --ip-masq=false --mtu=1450 --ipv6 --fixed-cidr-v6=fd00:10:244:3::/64\"\n", string(b))

	var stdout bytes.Buffer
	require.NoError(t, DockerOptsCommand([]string{"-f", good, "-d", "-", "-i", "-m"}, &stdout, io.Discard))
	assert.Equal(t, "DOCKER_OPT_BIP=\"--bip=10.244.3.1/24\"\nDOCKER_OPT_MTU=\"--mtu=1450\"\nDOCKER_OPT_IPV6=\"--ipv6 --fixed-cidr-v6=fd00:10:244:3::/64\"\n", stdout.String())

	err = DockerOptsCommand([]string{"-f", filepath.Join(dir, "missing.env"), "-d", "-"}, io.Discard, io.Discard)
	assert.ErrorContains(t, err, "missing.env")
	assert.ErrorIs(t, err, os.ErrNotExist)
	err = DockerOptsCommand([]string{"-f", bad, "-d", "-"}, io.Discard, io.Discard)
	assert.ErrorContains(t, err, "FLANNEL_SUBNET")
	assert.ErrorContains(t, DockerOptsCommand([]string{"-x"}, io.Discard, io.Discard), "-x")
}

// TestDockerOptsTooEarly: docker-opts run before flanneld has written
// subnet.env (or while a partial one is there) fails with advice and
// writes no options file.
func TestDockerOptsTooEarly(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	out := filepath.Join(dir, "docker")
	err := DockerOptsCommand([]string{"-f", filepath.Join(dir, "subnet.env"), "-d", out, "-c"}, io.Discard, io.Discard)
	require.Error(t, err)
	assert.ErrorIs(t, err, os.ErrNotExist)
	assert.ErrorContains(t, err, "start flanneld first")

	partial := filepath.Join(dir, "partial.env")
	require.NoError(t, os.WriteFile(partial, []byte("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\n"), 0o644))
	err = DockerOptsCommand([]string{"-f", partial, "-d", out, "-c"}, io.Discard, io.Discard)
	assert.ErrorIs(t, err, flannel.ErrSubnetEnvIncomplete)
	assert.ErrorContains(t, err, "FLANNEL_MTU")
	assert.ErrorContains(t, err, "after flanneld is up")
	assert.NoFileExists(t, out)
}
