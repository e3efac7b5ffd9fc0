package flannel_test

import (
	"io/fs"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
)

var (
	pfx = netip.MustParsePrefix
)

func TestWriteSubnetEnvFormat(t *testing.T) {
	t.Parallel()
	// Byte for byte upstream flannel's subnet.env (compat/subnet.env).
	const sample = "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
	tests := []struct {
		name string
		env  flannel.SubnetEnv
		want string
	}{
		{
			name: "ipv4 matches upstream sample",
			env:  flannel.SubnetEnv{Network: pfx("10.244.0.0/16"), Subnet: pfx("10.244.3.1/24"), MTU: 1450, IPMasq: true},
			want: sample,
		},
		{
			name: "ipv6 only",
			env:  flannel.SubnetEnv{IPv6Network: pfx("fd00:10:244::/56"), IPv6Subnet: pfx("fd00:10:244:3::1/64"), MTU: 1430},
			want: "FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:3::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n",
		},
		{
			name: "dual stack",
			env: flannel.SubnetEnv{
				Network: pfx("10.244.0.0/16"), Subnet: pfx("10.244.3.1/24"),
				IPv6Network: pfx("fd00:10:244::/56"), IPv6Subnet: pfx("fd00:10:244:3::1/64"),
				MTU: 1450, IPMasq: true,
			},
			want: "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:3::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			path := filepath.Join(t.TempDir(), "run", "flannel", "subnet.env") // directories created
			require.NoError(t, flannel.WriteSubnetEnv(path, tc.env))
			got, err := os.ReadFile(path)
			require.NoError(t, err)
			assert.Equal(t, tc.want, string(got))

			back, err := flannel.ReadSubnetEnv(path)
			require.NoError(t, err)
			assert.Equal(t, tc.env, back)
		})
	}
}

func TestWriteSubnetEnvRejectsIncomplete(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		env  flannel.SubnetEnv
	}{
		{name: "empty", env: flannel.SubnetEnv{MTU: 1450}},
		{name: "ipv4 network without subnet", env: flannel.SubnetEnv{Network: pfx("10.244.0.0/16")}},
		{name: "ipv6 subnet without network", env: flannel.SubnetEnv{IPv6Subnet: pfx("fd00::1/64")}},
		{name: "ipv4 field holds ipv6", env: flannel.SubnetEnv{Network: pfx("fd00::/56"), Subnet: pfx("fd00::1/64")}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := filepath.Join(dir, "subnet.env")
			require.Error(t, flannel.WriteSubnetEnv(path, tc.env))
			entries, err := os.ReadDir(dir)
			require.NoError(t, err)
			assert.Empty(t, entries, "nothing written")
		})
	}
}

func TestWriteSubnetEnvAtomicReplace(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	path := filepath.Join(dir, "subnet.env")
	envs := []flannel.SubnetEnv{
		{Network: pfx("10.244.0.0/16"), Subnet: pfx("10.244.3.1/24"), MTU: 1450, IPMasq: true},
		{
			Network: pfx("10.245.0.0/16"), Subnet: pfx("10.245.77.1/24"),
			IPv6Network: pfx("fd00:10:245::/56"), IPv6Subnet: pfx("fd00:10:245:4d::1/64"), MTU: 1400,
		},
	}
	// Pre-existing file with other permissions: replaced, mode fixed.
	require.NoError(t, os.WriteFile(path, []byte("FLANNEL_SUBNET=10.1.1.1/24\n"), 0o600))

	// A reader running alongside repeated writes only ever sees complete
	// contents of one of the two versions.
	valid := map[string]bool{}
	for _, e := range envs {
		p := filepath.Join(t.TempDir(), "ref")
		require.NoError(t, flannel.WriteSubnetEnv(p, e))
		b, err := os.ReadFile(p)
		require.NoError(t, err)
		valid[string(b)] = true
	}
	require.NoError(t, flannel.WriteSubnetEnv(path, envs[0]))

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var bad []string
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-stop:
				return
			default:
			}
			b, err := os.ReadFile(path)
			if err != nil || !valid[string(b)] {
				bad = append(bad, string(b)+" err="+errString(err))
			}
		}
	}()
	for i := range 200 {
		require.NoError(t, flannel.WriteSubnetEnv(path, envs[i%2]))
	}
	close(stop)
	wg.Wait()
	assert.Empty(t, bad, "partial or missing content observed")

	fi, err := os.Stat(path)
	require.NoError(t, err)
	assert.Equal(t, fs.FileMode(0o644), fi.Mode().Perm())
	entries, err := os.ReadDir(dir)
	require.NoError(t, err)
	require.Len(t, entries, 1, "no temporary files left behind")
	assert.Equal(t, "subnet.env", entries[0].Name())
}

func errString(err error) string {
	if err == nil {
		return "<nil>"
	}
	return err.Error()
}

func TestReadSubnetEnv(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		content string
		want    flannel.SubnetEnv
		wantErr string
	}{
		{
			name:    "tolerates comments unknown keys and quotes",
			content: "# written by flanneld\n\nFLANNEL_NETWORK=10.244.0.0/16\nFOO=bar\ngarbage line\nexport FLANNEL_SUBNET=\"10.244.3.1/24\"\nFLANNEL_MTU= 1450\nFLANNEL_IPMASQ=false\n",
			want:    flannel.SubnetEnv{Network: pfx("10.244.0.0/16"), Subnet: pfx("10.244.3.1/24"), MTU: 1450},
		},
		{
			name:    "bad subnet names line and key",
			content: "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.x/24\n",
			wantErr: `line 2: FLANNEL_SUBNET "10.244.3.x/24"`,
		},
		{
			name:    "wrong family",
			content: "FLANNEL_IPV6_SUBNET=10.244.3.1/24\n",
			wantErr: "line 1: FLANNEL_IPV6_SUBNET",
		},
		{
			name:    "bad mtu",
			content: "FLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=big\n",
			wantErr: `line 2: FLANNEL_MTU "big"`,
		},
		{
			name:    "bad ipmasq",
			content: "FLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_IPMASQ=maybe\n",
			wantErr: "line 2: FLANNEL_IPMASQ",
		},
		{
			name:    "no subnet",
			content: "FLANNEL_MTU=1450\n",
			wantErr: "neither FLANNEL_SUBNET nor FLANNEL_IPV6_SUBNET",
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			path := filepath.Join(t.TempDir(), "subnet.env")
			require.NoError(t, os.WriteFile(path, []byte(tc.content), 0o644))
			got, err := flannel.ReadSubnetEnv(path)
			if tc.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tc.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}

	t.Run("missing file", func(t *testing.T) {
		t.Parallel()
		_, err := flannel.ReadSubnetEnv(filepath.Join(t.TempDir(), "nope"))
		require.Error(t, err)
		assert.ErrorIs(t, err, fs.ErrNotExist)
	})
}

func TestSubnetEnvFor(t *testing.T) {
	t.Parallel()
	l := lease.Lease{Subnet: pfx("10.244.3.0/24"), IPv6Subnet: pfx("fd00:10:244:3::/64")}
	tests := []struct {
		name string
		cfg  lease.Config
		want flannel.SubnetEnv
	}{
		{
			name: "ipv4",
			cfg:  lease.Config{EnableIPv4: true, Network: pfx("10.244.0.0/16")},
			want: flannel.SubnetEnv{Network: pfx("10.244.0.0/16"), Subnet: pfx("10.244.3.1/24"), MTU: 1450, IPMasq: true},
		},
		{
			name: "ipv6",
			cfg:  lease.Config{EnableIPv6: true, IPv6Network: pfx("fd00:10:244::/56")},
			want: flannel.SubnetEnv{IPv6Network: pfx("fd00:10:244::/56"), IPv6Subnet: pfx("fd00:10:244:3::1/64"), MTU: 1450, IPMasq: true},
		},
		{
			name: "dual",
			cfg:  lease.Config{EnableIPv4: true, Network: pfx("10.244.0.0/16"), EnableIPv6: true, IPv6Network: pfx("fd00:10:244::/56")},
			want: flannel.SubnetEnv{
				Network: pfx("10.244.0.0/16"), Subnet: pfx("10.244.3.1/24"),
				IPv6Network: pfx("fd00:10:244::/56"), IPv6Subnet: pfx("fd00:10:244:3::1/64"), MTU: 1450, IPMasq: true,
			},
		},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			got := flannel.SubnetEnvFor(tc.cfg, l, 1450, true)
			assert.Equal(t, tc.want, got)
			back := got.Lease()
			if tc.cfg.EnableIPv4 {
				assert.Equal(t, l.Subnet, back.Subnet)
			}
			if tc.cfg.EnableIPv6 {
				assert.Equal(t, l.IPv6Subnet, back.IPv6Subnet)
			}
		})
	}
}
