package backend

import (
	"net"
	"net/netip"
	"os"
	"runtime"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/internal/testenv"
)

// newNS creates a throwaway (unnamed) network namespace with lo up and
// returns it with a handle bound to it; both are closed at cleanup, which
// destroys the namespace and everything in it. The test's own thread never
// changes namespace: the namespace is created on a locked thread of a
// helper goroutine that switches back (or dies locked).
func newNS(t *testing.T) (netns.NsHandle, *netlink.Handle) {
	t.Helper()
	testenv.RequireRoot(t)
	var (
		ns  netns.NsHandle
		err error
	)
	done := make(chan struct{})
	go func() {
		defer close(done)
		runtime.LockOSThread()
		orig, gerr := netns.Get()
		if gerr != nil {
			err = gerr
			runtime.UnlockOSThread()
			return
		}
		defer orig.Close()
		ns, err = netns.New()
		if serr := netns.Set(orig); serr != nil {
			err = serr
			return // stays locked: the thread dies
		}
		runtime.UnlockOSThread()
	}()
	<-done
	require.NoError(t, err, "new namespace")
	t.Cleanup(func() { ns.Close() })
	h, err := netlink.NewHandleAt(ns)
	require.NoError(t, err)
	t.Cleanup(h.Close)
	lo, err := h.LinkByName("lo")
	require.NoError(t, err)
	require.NoError(t, h.LinkSetUp(lo))
	return ns, h
}

// addVeth creates a veth pair name<->name+"p" inside h's namespace, both
// up, with addrs (CIDR strings) on name, and returns name's link.
func addVeth(t *testing.T, h *netlink.Handle, name string, addrs ...string) netlink.Link {
	t.Helper()
	require.NoError(t, h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: name}, PeerName: name + "p"}))
	link, err := h.LinkByName(name)
	require.NoError(t, err)
	peer, err := h.LinkByName(name + "p")
	require.NoError(t, err)
	for _, a := range addrs {
		p := netip.MustParsePrefix(a)
		addr := &netlink.Addr{IPNet: &net.IPNet{IP: IPFromAddr(p.Addr()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}}
		if p.Addr().Is6() {
			addr.Flags = unix.IFA_F_NODAD // usable at once
		}
		require.NoError(t, h.AddrAdd(link, addr), "add %s to %s", a, name)
	}
	require.NoError(t, h.LinkSetUp(peer))
	require.NoError(t, h.LinkSetUp(link))
	link, err = h.LinkByName(name)
	require.NoError(t, err)
	return link
}

func TestSetSysctlOnlyInNamespace(t *testing.T) {
	ns, _ := newNS(t)
	hostBefore, err := os.ReadFile("/proc/sys/net/ipv4/conf/all/forwarding")
	require.NoError(t, err)

	v, err := GetSysctl(ns, "net.ipv4.conf.all.forwarding")
	require.NoError(t, err)
	assert.Equal(t, "0", v, "a new namespace starts with forwarding off")

	require.NoError(t, SetSysctl(ns, "net/ipv4/conf/all/forwarding", "1"))
	v, err = GetSysctl(ns, "/proc/sys/net/ipv4/conf/all/forwarding")
	require.NoError(t, err)
	assert.Equal(t, "1", v)

	hostAfter, err := os.ReadFile("/proc/sys/net/ipv4/conf/all/forwarding")
	require.NoError(t, err)
	assert.Equal(t, string(hostBefore), string(hostAfter), "host namespace untouched")

	err = SetSysctl(ns, "net.ipv4.no_such_knob", "1")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "net.ipv4.no_such_knob")
	assert.Error(t, SetSysctl(netns.None(), "net.ipv4.ip_forward", "1"), "closed handle")
}

func TestInNamespaceRunsThere(t *testing.T) {
	ns, h := newNS(t)
	addVeth(t, h, "probe0")
	var names []string
	require.NoError(t, InNamespace(ns, func() error {
		ifs, err := net.Interfaces() // the current thread's namespace
		for _, i := range ifs {
			names = append(names, i.Name)
		}
		return err
	}))
	assert.Contains(t, names, "probe0")
	wantErr := os.ErrInvalid
	assert.ErrorIs(t, InNamespace(ns, func() error { return wantErr }), wantErr)
}

func TestSysctlPath(t *testing.T) {
	tests := []struct{ in, want, err string }{
		{in: "net.ipv4.ip_forward", want: "/proc/sys/net/ipv4/ip_forward"},
		{in: "net/ipv4/conf/eth0.100/rp_filter", want: "/proc/sys/net/ipv4/conf/eth0.100/rp_filter"},
		{in: "/proc/sys/net/ipv6/conf/all/forwarding", want: "/proc/sys/net/ipv6/conf/all/forwarding"},
		{in: "../../etc/passwd", err: "not under /proc/sys"},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, err := sysctlPath(tc.in)
			if tc.err != "" {
				assert.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}
