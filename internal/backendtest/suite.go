package backendtest

import (
	"context"
	"errors"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"go.uber.org/goleak"
	"golang.org/x/sys/unix"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/lease"
)

// Fixture is what Run needs of a dataplane.
type Fixture struct {
	// Type is the backend type of the dataplane's leases.
	Type string
	// New returns a fresh, unprepared Backend whose Networks repair every
	// repair (their RepairInterval). Required.
	New func(t *testing.T, repair time.Duration) flannel.Backend
	// Dump renders the kernel entries the backend owns on n, by names and
	// addresses and never by interface index, so that a repaired (e.g.
	// recreated) device shows as it was. Required; it must show at least
	// one entry per programmed peer.
	Dump func(t *testing.T, n *Node) []string
	// Damage lists ways to delete part of what the backend programmed on n
	// for peer: entries and, where the dataplane has any, devices. Run
	// must repair each. At least one is required; the first must delete
	// no device.
	Damage []Damage
	// IPv4 and IPv6 select the lab's families; both false: dual-stack.
	IPv4, IPv6 bool
}

// Damage is one way to break a programmed dataplane.
type Damage struct {
	Name string
	Do   func(t *testing.T, n, peer *Node)
}

// Run checks the Backend contract of flannel.go on a three-node lab per
// case: Apply idempotence, removal of stale entries (of this Network and
// of a previous run), peers of other backend types skipped, a
// *flannel.PeerError naming a peer that cannot be programmed (warned about
// once, not on every repair), repair by Network.Run of every Damage (on
// kernel events, and on the timer without a namespace handle), no repair
// before the first Apply, Cleanup (twice, leaving other routes alone), and
// a restart (a new Backend and Network over the same kernel state) that
// changes no kernel entry. Routes that are not the backend's stay through
// all of it.
func Run(t *testing.T, f Fixture) {
	require.NotNil(t, f.New)
	require.NotNil(t, f.Dump)
	require.NotEmpty(t, f.Damage)
	if !f.IPv4 && !f.IPv6 {
		f.IPv4, f.IPv6 = true, true
	}
	s := suite{f: f}
	// The cases that check for leaked goroutines run one at a time, first;
	// the others then run in parallel.
	t.Run("RunRepairs", s.repairs)
	t.Run("RunRepairsWithoutNamespace", s.repairsNoNS)
	for _, c := range []struct {
		name string
		run  func(*testing.T)
	}{
		{"ApplyTwiceChangesNothing", s.applyTwice},
		{"StaleEntriesRemoved", s.stale},
		{"OtherBackendTypesSkipped", s.otherTypes},
		{"PeerError", s.peerError},
		{"NoRepairBeforeFirstApply", s.noRepairBeforeApply},
		{"CleanupTwice", s.cleanup},
		{"RestartChangesNothing", s.restart},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			c.run(t)
		})
	}
}

type suite struct{ f Fixture }

// cluster builds a three-node lab whose Networks repair every repair.
// Nodes 0 and 1 are the subjects; node 2 is the peer that leaves.
func (s suite) cluster(t *testing.T, repair time.Duration, noNS bool) *Cluster {
	t.Helper()
	return NewCluster(t, ClusterOptions{
		Lab:  netlab.Options{Nodes: 3, IPv4: s.f.IPv4, IPv6: s.f.IPv6},
		Type: s.f.Type,
		New:  func(t *testing.T, _ int) flannel.Backend { return s.f.New(t, repair) },
		NoNS: noNS,
	})
}

func (s suite) dump(t *testing.T, n *Node) []string {
	t.Helper()
	d := slices.Clone(s.f.Dump(t, n))
	slices.Sort(d)
	return d
}

// apply applies peers on n and requires no error.
func apply(t *testing.T, n *Node, peers ...lease.Lease) {
	t.Helper()
	require.NoError(t, n.Net.Apply(context.Background(), peers), "apply on %s", n.Node.Name)
}

// restartNode replaces n's Backend and Network with new ones over the
// same kernel state, as a restarted agent does (n.Lease becomes the new
// lease).
func (s suite) restartNode(t *testing.T, c *Cluster, n *Node, repair time.Duration) {
	t.Helper()
	i := slices.Index(c.Nodes, n)
	n.Backend = s.f.New(t, repair)
	n.Lease = c.Start(t, n, i)
}

// peerLike is a copy of p's lease for the subnets 10.244.<k>.0/24 and
// fd00:10:244:<k>::/64.
func (c *Cluster) peerLike(p *Node, k int) lease.Lease {
	l := p.Lease
	if l.Subnet.IsValid() {
		l.Subnet = netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(k), 0}), 24)
	}
	if l.IPv6Subnet.IsValid() {
		a := l.IPv6Subnet.Addr().As16()
		a[7] = byte(k)
		l.IPv6Subnet = netip.PrefixFrom(netip.AddrFrom16(a), 64)
	}
	return l
}

// ghost is a valid peer that is to leave: the third node's lease (its
// own backend data, e.g. keys or MACs, as a real peer has).
func (c *Cluster) ghost() lease.Lease { return c.Nodes[2].Lease }

// foreign adds routes that are not the backend's on n's external
// interface, via peer, and returns them as Snapshot shows them: a static
// route of a subnet's size and a boot route (what `ip route add` writes)
// of another size. (A boot route of exactly a subnet's size inside the
// network is what upstream flanneld leaves behind; a dataplane may adopt
// those, see backend.UpstreamRoute.)
func foreign(t *testing.T, n, peer *Node) []string {
	t.Helper()
	for _, r := range []struct {
		dst   string
		gw    netip.Addr
		proto netlink.RouteProtocol
	}{{"10.244.96.0/24", peer.Node.IP, unix.RTPROT_STATIC}, {"fd00:10:244:90::/60", peer.Node.IPv6, unix.RTPROT_BOOT}} {
		if !r.gw.IsValid() {
			continue
		}
		rt := netlink.Route{
			Dst: ipconv.IPNetFromPrefix(netip.MustParsePrefix(r.dst)), Gw: ipconv.IPFromAddr(r.gw),
			LinkIndex: n.Env.Iface.Index, Protocol: r.proto,
		}
		require.NoError(t, n.Node.Handle.RouteAdd(&rt), "add route %s", backend.FormatRoute(rt))
	}
	var added []string
	for _, l := range Snapshot(t, n) {
		if strings.HasPrefix(l, "route 10.244.96.0/24 ") || strings.HasPrefix(l, "route fd00:10:244:90::/60 ") {
			added = append(added, l)
		}
	}
	require.NotEmpty(t, added)
	return added
}

// poll fails the test unless cond holds within CheckTimeout.
func poll(t *testing.T, cond func() bool, msg string, args ...any) {
	t.Helper()
	require.Eventually(t, cond, CheckTimeout, 20*time.Millisecond, append([]any{msg}, args...)...)
}

// warnings counts the warning lines of n's logs that contain every part.
func warnings(n *Node, parts ...string) int {
	k := 0
	for line := range strings.Lines(n.Logs.String()) {
		ok := strings.Contains(line, "level=WARN")
		for _, p := range parts {
			ok = ok && strings.Contains(line, p)
		}
		if ok {
			k++
		}
	}
	return k
}

// peerErrors returns the *flannel.PeerError values err joins.
func peerErrors(err error) []*flannel.PeerError {
	var out []*flannel.PeerError
	for _, e := range backend.PeerErrorLeaves(err) {
		var pe *flannel.PeerError
		if errors.As(e, &pe) {
			out = append(out, pe)
		}
	}
	return out
}

func assertContainsAll(t *testing.T, have, want []string, msg string) {
	t.Helper()
	for _, w := range want {
		assert.Contains(t, have, w, msg)
	}
}

// verifyNoLeak checks that no goroutine started after ignore is left.
func verifyNoLeak(t *testing.T, ignore goleak.Option) {
	t.Helper()
	goleak.VerifyNone(t, ignore)
}
