package wireguard_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/backendtest"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/wireguard"
)

// TestInVMContract runs the dataplane contract suite dual-stack, in the
// separate mode (two devices) and the auto mode (one). Its damage: a
// route of ours deleted, a device set down, every device deleted. (A peer
// deleted by hand sends no kernel notification, so only the periodic
// repair sees it: TestInVMPeerDeletedRepaired.)
func TestInVMContract(t *testing.T) {
	inVM(t)
	for _, mode := range []wireguard.Mode{wireguard.ModeSeparate, wireguard.ModeAuto} {
		t.Run(string(mode), func(t *testing.T) {
			keys := t.TempDir()
			backendtest.Run(t, backendtest.Fixture{
				Type: wireguard.Type,
				New: func(t *testing.T, repair time.Duration) flannel.Backend {
					return &fixtureBackend{t: t, keys: keys, opts: wireguard.Options{Mode: mode, RepairInterval: repair}}
				},
				Dump:   dumpWG,
				Damage: wgDamage,
			})
		})
	}
}

var wgDamage = []backendtest.Damage{
	{Name: "route", Do: func(t *testing.T, n, _ *backendtest.Node) {
		rs := ourWGRoutes(t, n.Node.Handle, wireguard.DeviceName)
		require.NotEmpty(t, rs)
		require.NoError(t, n.Node.Handle.RouteDel(&rs[0]))
	}},
	{Name: "device down", Do: func(t *testing.T, n, _ *backendtest.Node) {
		l, err := n.Node.Handle.LinkByName(wireguard.DeviceName)
		require.NoError(t, err)
		require.NoError(t, n.Node.Handle.LinkSetDown(l))
	}},
	{Name: "devices deleted", Do: func(t *testing.T, n, _ *backendtest.Node) {
		for _, name := range []string{wireguard.DeviceNameV6, wireguard.DeviceName} {
			l, err := n.Node.Handle.LinkByName(name)
			if errors.As(err, &netlink.LinkNotFoundError{}) {
				continue // the auto mode has one device
			}
			require.NoError(t, err)
			require.NoError(t, n.Node.Handle.LinkDel(l))
		}
	}},
}

// fixtureBackend is a wireguard Backend as an agent of node makes it: its
// key file is the node's (found by the namespace it runs in), so that a
// restarted Network keeps the key. wireguard needs a namespace for wgctrl
// (Prepare fails without one); given an Env without NS, it finds the
// namespace env.Handle is bound to and uses that for wgctrl (the suite's
// "without a namespace" case then still checks the periodic repair of
// peers an intruder programmed, which no kernel event reports).
type fixtureBackend struct {
	t    *testing.T
	keys string
	opts wireguard.Options

	mu sync.Mutex
	b  *wireguard.Backend
}

var _ flannel.Backend = (*fixtureBackend)(nil)

func (f *fixtureBackend) Type() string { return wireguard.Type }

func (f *fixtureBackend) Prepare(ctx context.Context, env flannel.Env) (lease.Attrs, error) {
	if !env.NS.IsOpen() {
		env.NS = nsOfHandle(f.t, env.Handle)
	}
	node := backendtest.NodeName(f.t, env.NS)
	f.mu.Lock()
	if f.b == nil {
		o := f.opts
		o.KeyFile = filepath.Join(f.keys, node, "wgkey")
		b, err := wireguard.New(o)
		require.NoError(f.t, err)
		f.b = b
	}
	b := f.b
	f.mu.Unlock()
	return b.Prepare(ctx, env)
}

func (f *fixtureBackend) Start(ctx context.Context, own lease.Lease) (flannel.Network, error) {
	f.mu.Lock()
	b := f.b
	f.mu.Unlock()
	if b == nil {
		return nil, errors.New("Prepare was not called")
	}
	return b.Start(ctx, own)
}

func (f *fixtureBackend) Cleanup(ctx context.Context, env flannel.Env) error {
	b, err := wireguard.New(f.opts)
	require.NoError(f.t, err)
	return b.Cleanup(ctx, env)
}

// nsOfHandle finds the named namespace (netlab's, under /run/netns) that h
// is bound to: it marks h's loopback with an alias and looks for it. The
// handle is closed when the test ends.
func nsOfHandle(t *testing.T, h *netlink.Handle) netns.NsHandle {
	t.Helper()
	lo, err := h.LinkByName("lo")
	require.NoError(t, err)
	mark := fmt.Sprintf("wg-fixture-%x", rand.Uint64())
	require.NoError(t, h.LinkSetAlias(lo, mark))
	defer func() { require.NoError(t, h.LinkSetAlias(lo, "")) }()
	entries, err := os.ReadDir("/run/netns")
	require.NoError(t, err)
	for _, e := range entries {
		ns, err := netns.GetFromPath(filepath.Join("/run/netns", e.Name()))
		if err != nil {
			continue
		}
		found := false
		if hh, err := netlink.NewHandleAt(ns); err == nil {
			l, err := hh.LinkByName("lo")
			found = err == nil && l.Attrs().Alias == mark
			hh.Close()
		}
		if found {
			t.Cleanup(func() { ns.Close() })
			return ns
		}
		ns.Close()
	}
	t.Fatalf("no namespace under /run/netns has the handle's loopback")
	return netns.None()
}

// ourWGRoutes lists the routes of ours on device dev (none when it is
// missing).
func ourWGRoutes(t *testing.T, h *netlink.Handle, dev string) []netlink.Route {
	t.Helper()
	link, err := h.LinkByName(dev)
	if errors.As(err, &netlink.LinkNotFoundError{}) {
		return nil
	}
	require.NoError(t, err)
	rs, err := nlsafe.Wrap(h).RouteListFiltered(netlink.FAMILY_ALL,
		&netlink.Route{LinkIndex: link.Attrs().Index, Protocol: backend.RouteProtocol}, netlink.RT_FILTER_OIF|netlink.RT_FILTER_PROTOCOL)
	require.NoError(t, err)
	return rs
}

// dumpWG renders each flannel WireGuard device that exists on n (MTU, up,
// listen port, public key, addresses), its routes of ours, and its peers
// as wgctrl reads them (key, endpoint, AllowedIPs, keepalive).
func dumpWG(t *testing.T, n *backendtest.Node) []string {
	t.Helper()
	h := n.Node.Handle
	var out []string
	for _, name := range []string{wireguard.DeviceName, wireguard.DeviceNameV6} {
		l, err := h.LinkByName(name)
		if errors.As(err, &netlink.LinkNotFoundError{}) {
			continue
		}
		require.NoError(t, err)
		d, err := wireguard.ReadDevice(n.Node.NS, name)
		require.NoError(t, err)
		line := fmt.Sprintf("device %s type %s mtu %d up %t port %d key %s", name, l.Type(), l.Attrs().MTU,
			l.Attrs().Flags&net.FlagUp != 0, d.ListenPort, d.PublicKey)
		addrs, err := nlsafe.Wrap(h).AddrList(l, netlink.FAMILY_ALL)
		require.NoError(t, err)
		for _, a := range addrs {
			if p, ok := ipconv.PrefixFromIPNet(a.IPNet); ok && !p.Addr().IsLinkLocalUnicast() {
				line += " addr " + p.String()
			}
		}
		out = append(out, line)
		for _, r := range ourWGRoutes(t, h, name) {
			out = append(out, fmt.Sprintf("route %s dev %s scope %d", r.Dst, name, r.Scope))
		}
		for _, p := range d.Peers {
			var allowed []string
			for _, a := range p.AllowedIPs {
				allowed = append(allowed, a.String())
			}
			slices.Sort(allowed)
			out = append(out, fmt.Sprintf("peer %s key %s endpoint %s allowed %v keepalive %v", name, p.PublicKey, p.Endpoint, allowed, p.PersistentKeepaliveInterval))
		}
	}
	return out
}
