package netlab

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestHostAddr(t *testing.T) {
	tests := []struct {
		name   string
		prefix string
		k      int
		want   string // "" = invalid
	}{
		{"v4 first", "10.244.1.0/24", 1, "10.244.1.1"},
		{"v4 unmasked input", "10.244.1.77/24", 2, "10.244.1.2"},
		{"v4 carry", "10.244.0.0/16", 300, "10.244.1.44"},
		{"v4 last host", "10.244.1.0/24", 254, "10.244.1.254"},
		{"v4 broadcast", "10.244.1.0/24", 255, ""},
		{"v4 outside", "10.244.1.0/24", 256, ""},
		{"v4 overflow", "255.255.255.0/24", 1000, ""},
		{"v6 first", "fd00:10:244:1::/64", 1, "fd00:10:244:1::1"},
		{"v6 carry", "fd00:10:244:1::/64", 0x1ff, "fd00:10:244:1::1ff"},
		{"v6 last", "fd00::/126", 3, "fd00::3"},
		{"v6 outside", "fd00::/126", 4, ""},
		{"v6 overflow", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ff00/120", 0x1000, ""},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := hostAddr(netip.MustParsePrefix(tc.prefix), tc.k)
			if tc.want == "" {
				assert.False(t, got.IsValid(), "got %s", got)
				return
			}
			assert.Equal(t, netip.MustParseAddr(tc.want), got)
		})
	}
}

func TestNodeAddrs(t *testing.T) {
	tests := []struct {
		i, segments int
		v4, v6      string
	}{
		{0, 1, "172.30.0.10", "fd00:172:30:0::a"},
		{1, 1, "172.30.0.11", "fd00:172:30:0::b"},
		{5, 2, "172.30.1.15", "fd00:172:30:1::f"},
		{6, 1, "172.30.0.16", "fd00:172:30:0::10"},
		{12, 10, "172.30.2.22", "fd00:172:30:2::16"},
		{244, 245, "172.30.244.254", "fd00:172:30:244::fe"},
	}
	for _, tc := range tests {
		v4, v6 := nodeAddrs(tc.i, tc.segments)
		assert.Equal(t, netip.MustParseAddr(tc.v4), v4, "node %d", tc.i)
		assert.Equal(t, netip.MustParseAddr(tc.v6), v6, "node %d", tc.i)
		assert.True(t, SegmentPrefix(tc.i%tc.segments).Contains(v4))
		assert.True(t, SegmentPrefix6(tc.i%tc.segments).Contains(v6))
	}
	assert.Equal(t, netip.MustParseAddr("172.30.3.1"), RouterIP(3))
	assert.Equal(t, netip.MustParseAddr("fd00:172:30:3::1"), RouterIPv6(3))
}

func TestOptionsDefaults(t *testing.T) {
	o, err := Options{Nodes: 1}.withDefaults()
	require.NoError(t, err)
	assert.Equal(t, Options{Nodes: 1, IPv4: true, Segments: 1, MTU: 1500}, o)

	o, err = Options{Nodes: 3, IPv6: true, Segments: 2, MTU: 9000}.withDefaults()
	require.NoError(t, err)
	assert.Equal(t, Options{Nodes: 3, IPv6: true, Segments: 2, MTU: 9000}, o)
}

func TestOptionsInvalid(t *testing.T) {
	tests := []struct {
		name string
		opts Options
	}{
		{"no nodes", Options{}},
		{"negative nodes", Options{Nodes: -1}},
		{"too many nodes", Options{Nodes: maxNodes + 1}},
		{"negative segments", Options{Nodes: 1, Segments: -1}},
		{"too many segments", Options{Nodes: 1, Segments: maxSegments + 1}},
		{"tiny mtu", Options{Nodes: 1, MTU: 100}},
		{"huge mtu", Options{Nodes: 1, MTU: 70000}},
		{"ipv6 mtu", Options{Nodes: 1, IPv6: true, MTU: 1200}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			// New rejects these before touching the kernel, so no root needed.
			l, err := New(tc.opts)
			assert.Error(t, err)
			assert.Nil(t, l)
		})
	}
}

func TestCheckPodArgs(t *testing.T) {
	v4 := netip.MustParsePrefix("10.244.0.0/24")
	v6 := netip.MustParsePrefix("fd00:10:244::/64")
	ok := podOptions{mtu: 1500}
	tests := []struct {
		name    string
		pod     string
		s4, s6  netip.Prefix
		o       podOptions
		wantErr bool
	}{
		{"v4", "p", v4, netip.Prefix{}, ok, false},
		{"v6", "p", netip.Prefix{}, v6, ok, false},
		{"dual", "p", v4, v6, ok, false},
		{"no subnet", "p", netip.Prefix{}, netip.Prefix{}, ok, true},
		{"empty name", "", v4, v6, ok, true},
		{"slash", "a/b", v4, v6, ok, true},
		{"dotdot", "..", v4, v6, ok, true},
		{"swapped", "p", v6, v4, ok, true},
		{"v4 too small", "p", netip.MustParsePrefix("10.0.0.0/31"), netip.Prefix{}, ok, true},
		{"v6 too small", "p", netip.Prefix{}, netip.MustParsePrefix("fd00::/127"), ok, true},
		{"v6 small mtu", "p", netip.Prefix{}, v6, podOptions{mtu: 1200}, true},
		{"v4 small mtu ok", "p", v4, netip.Prefix{}, podOptions{mtu: 1200}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := checkPodArgs(tc.pod, tc.s4, tc.s6, tc.o)
			if tc.wantErr {
				assert.Error(t, err)
			} else {
				assert.NoError(t, err)
			}
		})
	}
}

func TestEchoID(t *testing.T) {
	v4 := make([]byte, 28)
	v4[0] = 0x45
	v4[9] = 1
	v4[20] = 8 // echo request
	v4[24], v4[25] = 0x12, 0x34
	assert.Equal(t, 0x1234, echoID(v4, false))
	assert.Equal(t, -1, echoID(v4[:25], false))
	v4[20] = 0
	assert.Equal(t, -1, echoID(v4, false))

	v6 := make([]byte, 48)
	v6[6] = 58
	v6[40] = 128
	v6[44], v6[45] = 0xab, 0xcd
	assert.Equal(t, 0xabcd, echoID(v6, true))
	v6[6] = 17
	assert.Equal(t, -1, echoID(v6, true))
}

// TestDeleteNamedNSNotMounted: a name under /run/netns that is no mount
// any more (another process's delete between its unmount and its unlink)
// is removed and counts as deleted.
func TestDeleteNamedNSNotMounted(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root (/run/netns)")
	}
	require.NoError(t, os.MkdirAll(netnsDir, 0o755))
	name := fmt.Sprintf("fltest%x-node0", os.Getpid())
	path := filepath.Join(netnsDir, name)
	require.NoError(t, os.WriteFile(path, nil, 0o444))
	t.Cleanup(func() { os.Remove(path) })
	require.NoError(t, deleteNamedNS(name))
	_, err := os.Stat(path)
	assert.ErrorIs(t, err, os.ErrNotExist)
	require.NoError(t, deleteNamedNS(name), "already gone")
}
