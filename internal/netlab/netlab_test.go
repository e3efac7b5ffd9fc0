package netlab_test

import (
	"context"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"

	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/testenv"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var (
	podNet0  = netip.MustParsePrefix("10.244.0.0/24")
	podNet1  = netip.MustParsePrefix("10.244.1.0/24")
	podNet60 = netip.MustParsePrefix("fd42:244:0::/64")
	podNet61 = netip.MustParsePrefix("fd42:244:1::/64")
)

func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestTopology(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		opts netlab.Options
	}{
		{"ipv4", netlab.Options{Nodes: 2}},
		{"ipv6", netlab.Options{Nodes: 2, IPv6: true}},
		{"dual", netlab.Options{Nodes: 2, IPv4: true, IPv6: true}},
		{"dual-2-segments", netlab.Options{Nodes: 3, IPv4: true, IPv6: true, Segments: 2, MTU: 1400}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			lab := netlab.NewT(t, tc.opts)
			require.Len(t, lab.Nodes, tc.opts.Nodes)
			segs := max(tc.opts.Segments, 1)
			v4 := tc.opts.IPv4 || !tc.opts.IPv6
			for i, n := range lab.Nodes {
				assert.Equal(t, i%segs, n.Segment)
				assert.Equal(t, "eth0", n.Iface)
				assert.Equal(t, v4, n.IP.IsValid(), "node %s IPv4", n.Name)
				assert.Equal(t, tc.opts.IPv6, n.IPv6.IsValid(), "node %s IPv6", n.Name)
				_, err := os.Stat(filepath.Join("/run/netns", n.NSName))
				assert.NoError(t, err)
			}
			// Every node reaches every other node's underlay address,
			// across the router when segments differ.
			for _, a := range lab.Nodes {
				for _, b := range lab.Nodes {
					for _, ip := range []netip.Addr{b.IP, b.IPv6} {
						if ip.IsValid() {
							assert.NoError(t, a.Ping(ctxTimeout(t, 10*time.Second), ip))
						}
					}
				}
			}
		})
	}
}

func TestPodsSameNode(t *testing.T) {
	t.Parallel()
	lab := netlab.NewT(t, netlab.Options{Nodes: 1})
	n := lab.Nodes[0]
	a, err := n.AddPod("a", podNet0, podNet60)
	require.NoError(t, err)
	b, err := n.AddPod("b", podNet0, podNet60)
	require.NoError(t, err)
	assert.Equal(t, netip.MustParseAddr("10.244.0.2"), a.IP)
	assert.Equal(t, netip.MustParseAddr("10.244.0.3"), b.IP)
	assert.Equal(t, netip.MustParseAddr("fd42:244::2"), a.IPv6)
	assert.Equal(t, netip.MustParseAddr("fd42:244::3"), b.IPv6)
	for _, ip := range []netip.Addr{b.IP, b.IPv6} {
		assert.NoError(t, a.Ping(ctxTimeout(t, 10*time.Second), ip))
		assert.NoError(t, a.TCPCheck(ctxTimeout(t, 10*time.Second), b, ip))
	}
	assert.True(t, strings.HasPrefix(a.NSName, lab.Name+"-"))
}

func TestPodsDifferentNodesIsolated(t *testing.T) {
	t.Parallel()
	lab := netlab.NewT(t, netlab.Options{Nodes: 2})
	a, err := lab.Nodes[0].AddPod("a", podNet0, netip.Prefix{})
	require.NoError(t, err)
	b, err := lab.Nodes[1].AddPod("b", podNet1, netip.Prefix{})
	require.NoError(t, err)
	err = a.Ping(ctxTimeout(t, 600*time.Millisecond), b.IP)
	require.Error(t, err)
	t.Log(err)
	err = a.TCPCheck(ctxTimeout(t, 600*time.Millisecond), b, b.IP)
	require.Error(t, err)
	t.Log(err)
}

func TestCloseRemovesEverything(t *testing.T) {
	t.Parallel()
	testenv.RequireRoot(t)
	lab, err := netlab.New(netlab.Options{Nodes: 2, Segments: 2, IPv6: true, IPv4: true})
	require.NoError(t, err)
	_, err = lab.Nodes[0].AddPod("p", podNet0, podNet60)
	require.NoError(t, err)
	names := lab.Namespaces()
	require.Len(t, names, 1+2+2+1)
	require.NoError(t, lab.Close())
	require.NoError(t, lab.Close())
	for _, name := range names {
		_, err := os.Stat(filepath.Join("/run/netns", name))
		assert.ErrorIs(t, err, os.ErrNotExist, name)
	}
	// After Close nothing touches the kernel any more (a closed netlink
	// handle would act in the test's own namespace).
	_, err = lab.Nodes[1].AddPod("late", podNet1, netip.Prefix{})
	assert.ErrorIs(t, err, netlab.ErrClosed)
	assert.ErrorIs(t, lab.Nodes[0].Do(func() error { return nil }), netlab.ErrClosed)
	assert.ErrorIs(t, lab.Nodes[0].Ping(t.Context(), lab.Nodes[1].IP), netlab.ErrClosed)
}
