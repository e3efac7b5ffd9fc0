package nlsafe_test

import (
	"net"
	"os"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/flannelkit/flannel/internal/nlsafe"
)

func TestInNamespaceRunsThere(t *testing.T) {
	t.Parallel()
	n, h := node(t)
	require.NoError(t, h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "probe0"}, PeerName: "probe0p"}))
	var names []string
	require.NoError(t, h.Do(func() error {
		ifs, err := net.Interfaces() // the current thread's namespace
		for _, i := range ifs {
			names = append(names, i.Name)
		}
		return err
	}))
	assert.Contains(t, names, "probe0")
	assert.ErrorIs(t, nlsafe.InNamespace(n.NS, func() error { return os.ErrInvalid }), os.ErrInvalid)
	assert.ErrorContains(t, nlsafe.InNamespace(netns.None(), func() error { return nil }), "not open")
}

func TestSysctlOnlyInNamespace(t *testing.T) {
	t.Parallel()
	_, h := node(t)
	const knob = "/proc/sys/net/ipv4/ip_default_ttl"
	hostBefore, err := os.ReadFile(knob)
	require.NoError(t, err)

	v, err := h.GetSysctl("net.ipv4.ip_default_ttl")
	require.NoError(t, err)
	require.Equal(t, "64", v, "a new namespace starts with the default")
	require.NoError(t, h.SetSysctl("net/ipv4/ip_default_ttl", "63"))
	v, err = nlsafe.GetSysctl(h.NS(), knob)
	require.NoError(t, err)
	assert.Equal(t, "63", v)
	require.NoError(t, h.SetSysctl("net.ipv4.ip_default_ttl", "63"), "the same value again")

	hostAfter, err := os.ReadFile(knob)
	require.NoError(t, err)
	assert.Equal(t, string(hostBefore), string(hostAfter), "host namespace untouched")

	err = h.SetSysctl("net.ipv4.no_such_knob", "1")
	assert.ErrorContains(t, err, "net.ipv4.no_such_knob")
	assert.ErrorContains(t, h.SetSysctl("../../etc/passwd", "x"), "not under /proc/sys")
	assert.Error(t, nlsafe.SetSysctl(netns.None(), "net.ipv4.ip_forward", "1"), "closed handle")
}

func TestCurrentNamespace(t *testing.T) {
	t.Parallel()
	n, _ := node(t)
	cur, err := netns.Get()
	require.NoError(t, err)
	defer cur.Close()
	assert.True(t, nlsafe.IsCurrentNamespace(cur))
	assert.False(t, nlsafe.IsCurrentNamespace(n.NS))
	assert.False(t, nlsafe.SubscribeNamespace(cur).IsOpen(), "no setns into the current namespace")
	assert.True(t, nlsafe.SubscribeNamespace(n.NS).Equal(n.NS))

	ran := false
	require.NoError(t, nlsafe.InNamespace(cur, func() error { ran = true; return nil }), "the current namespace needs no setns")
	assert.True(t, ran)
}

func TestNewNamespace(t *testing.T) {
	t.Parallel()
	cur, err := netns.Get()
	require.NoError(t, err)
	defer cur.Close()

	ns, err := nlsafe.NewNamespace()
	require.NoError(t, err)
	defer ns.Close()
	assert.False(t, ns.Equal(cur), "a namespace of its own")
	assert.False(t, nlsafe.IsCurrentNamespace(ns), "the caller's thread did not move")

	h, err := nlsafe.Open(ns)
	require.NoError(t, err)
	defer h.Close()
	links, err := h.LinkList()
	require.NoError(t, err)
	assert.Equal(t, []string{"lo"}, names(links), "a fresh namespace has only lo")
}
