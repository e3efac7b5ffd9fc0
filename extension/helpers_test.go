package extension_test

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/lease"
)

// script writes an executable sh script into dir and returns its path.
func script(t *testing.T, dir, name, body string) string {
	t.Helper()
	p := filepath.Join(dir, name)
	require.NoError(t, os.WriteFile(p, []byte("#!/bin/sh\n"+body+"\n"), 0o755))
	return p
}

// hostgwCommands program host-gw-style routes in the node namespace with
// plain ip commands, no shell, as upstream's documented example does.
func hostgwCommands() (add, remove string) {
	return "ip route replace $SUBNET via $PUBLIC_IP dev eth0", "ip route del $SUBNET via $PUBLIC_IP dev eth0"
}

// env builds the flannel.Env of a lab node.
func env(t *testing.T, n *netlab.Node, cfg lease.Config, logs *testenv.LogBuffer) flannel.Env {
	t.Helper()
	iface, err := backend.FindInterface(n.Handle, backend.InterfaceOptions{IPv4: true})
	require.NoError(t, err)
	return flannel.Env{Config: cfg, Iface: iface, Handle: n.Handle, NS: n.NS, Logger: logs.Logger()}
}

func config(t *testing.T) lease.Config {
	t.Helper()
	cfg, err := lease.ParseConfig([]byte(`{"Network":"10.244.0.0/16","Backend":{"Type":"extension"}}`))
	require.NoError(t, err)
	return cfg
}

// peerLease is a lease of subnet 10.244.<k>.0/24 whose node is at
// 172.30.0.<100+k> (an unused address on segment 0, so on-link).
func peerLease(k int, data string) lease.Lease {
	l := lease.Lease{
		Subnet: netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", k)),
		Attrs:  lease.Attrs{BackendType: "extension", PublicIP: netip.MustParseAddr(fmt.Sprintf("172.30.0.%d", 100+k))},
	}
	if data != "" {
		l.Attrs.BackendData = []byte(fmt.Sprintf("%q", data))
	}
	return l
}

// routes lists "dst via gw" of the IPv4 main-table routes in h's
// namespace via a gateway into 10.244.0.0/16.
func routes(t *testing.T, h *netlink.Handle) []string {
	t.Helper()
	rs, err := nlsafe.Wrap(h).RouteListFiltered(netlink.FAMILY_V4, nil, 0)
	require.NoError(t, err)
	var out []string
	for _, r := range rs {
		if r.Dst != nil && r.Gw != nil && strings.HasPrefix(r.Dst.String(), "10.244.") {
			out = append(out, fmt.Sprintf("%s via %s", r.Dst, r.Gw))
		}
	}
	slices.Sort(out)
	return out
}

func want(ls ...lease.Lease) []string {
	var out []string
	for _, l := range ls {
		out = append(out, fmt.Sprintf("%s via %s", l.Subnet, l.Attrs.PublicIP))
	}
	slices.Sort(out)
	return out
}

// nsInode is the inode of a namespace handle, as /proc/<pid>/ns/net
// shows it: "net:[<inode>]".
func nsInode(t *testing.T, fd int) string {
	t.Helper()
	var st unix.Stat_t
	require.NoError(t, unix.Fstat(fd, &st))
	return fmt.Sprintf("net:[%d]", st.Ino)
}

// lines reads a marker file's lines; none when it is missing.
func lines(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil
	}
	require.NoError(t, err)
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

func start(t *testing.T, b flannel.Backend, e flannel.Env, subnet string) (lease.Attrs, flannel.Network) {
	t.Helper()
	attrs, err := b.Prepare(context.Background(), e)
	require.NoError(t, err)
	own := lease.Lease{Subnet: netip.MustParsePrefix(subnet), Attrs: attrs}
	n, err := b.Start(context.Background(), own)
	require.NoError(t, err)
	return attrs, n
}
