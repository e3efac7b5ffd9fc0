package rules

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"go.uber.org/goleak"

	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/lease"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var (
	net4  = netip.MustParsePrefix("10.244.0.0/16")
	net6  = netip.MustParsePrefix("fd00:10:244::/56")
	modes = []Mode{ModeNFTables, ModeIPTables}
)

func requireTools(t *testing.T) {
	t.Helper()
	testenv.RequireRoot(t)
	for _, b := range []string{"nft", "iptables", "ip6tables", "ip"} {
		_, err := exec.LookPath(b)
		testenv.Require(t, err == nil, b+" binary not installed (Debian packages nftables, iptables, iproute2)")
	}
}

func subnets(i int) (netip.Prefix, netip.Prefix) {
	return netip.MustParsePrefix(fmt.Sprintf("10.244.%d.0/24", i)), netip.MustParsePrefix(fmt.Sprintf("fd00:10:244:%d::/64", i))
}

func config(v4, v6 bool) lease.Config {
	c := lease.Config{EnableIPv4: v4, EnableIPv6: v6}
	if v4 {
		c.Network = net4
	}
	if v6 {
		c.IPv6Network = net6
	}
	return c
}

func leaseOf(i int, v4, v6 bool) lease.Lease {
	s4, s6 := subnets(i)
	var l lease.Lease
	if v4 {
		l.Subnet = s4
	}
	if v6 {
		l.IPv6Subnet = s6
	}
	return l
}

// nsRun runs a command in the named namespace (as an operator would with
// ip netns exec) and returns its output.
func nsRun(t *testing.T, ns string, args ...string) string {
	t.Helper()
	out, err := exec.Command("ip", append([]string{"netns", "exec", ns}, args...)...).CombinedOutput()
	require.NoError(t, err, "ip netns exec %s %s: %s", ns, strings.Join(args, " "), out)
	return string(out)
}

// dump is the node's whole netfilter state as the tools print it.
func dump(t *testing.T, ns string) string {
	return nsRun(t, ns, "nft", "list", "ruleset") + nsRun(t, ns, "iptables-save") + nsRun(t, ns, "ip6tables-save")
}

func newManager(t *testing.T, n *netlab.Node, opts Options) *Manager {
	t.Helper()
	opts.NS = n.NS
	m, err := New(opts)
	require.NoError(t, err)
	t.Cleanup(func() { assert.NoError(t, m.Cleanup(context.Background())) })
	return m
}

// twoNodes builds a lab of two nodes with one pod each and host-gw style
// routes between their pod subnets 10.244.<i>.0/24 / fd00:10:244:<i>::/64.
func twoNodes(t *testing.T, v4, v6 bool) (*netlab.Lab, [2]*netlab.Pod) {
	lab := netlab.NewT(t, netlab.Options{Nodes: 2, IPv4: v4, IPv6: v6})
	var pods [2]*netlab.Pod
	for i, n := range lab.Nodes {
		s4, s6 := subnets(i)
		if !v4 {
			s4 = netip.Prefix{}
		}
		if !v6 {
			s6 = netip.Prefix{}
		}
		p, err := n.AddPod("p", s4, s6)
		require.NoError(t, err)
		pods[i] = p
		peer := lab.Nodes[1-i]
		p4, p6 := subnets(1 - i)
		link, err := n.Handle.LinkByName(n.Iface)
		require.NoError(t, err)
		for _, r := range []struct {
			on  bool
			dst netip.Prefix
			via netip.Addr
		}{{v4, p4, peer.IP}, {v6, p6, peer.IPv6}} {
			if !r.on {
				continue
			}
			require.NoError(t, n.Handle.RouteAdd(&netlink.Route{
				LinkIndex: link.Attrs().Index,
				Dst:       &net.IPNet{IP: r.dst.Addr().AsSlice(), Mask: net.CIDRMask(r.dst.Bits(), r.dst.Addr().BitLen())},
				Gw:        r.via.AsSlice(),
			}))
		}
	}
	return lab, pods
}

// seenFrom listens on dst in listenNS, connects from dialNS and returns the
// source address the listener sees.
func seenFrom(ctx context.Context, listenNS, dialNS netns.NsHandle, dst netip.Addr) (netip.Addr, error) {
	var ln net.Listener
	err := nlsafe.InNamespace(listenNS, func() error {
		var err error
		ln, err = net.Listen("tcp", netip.AddrPortFrom(dst, 0).String())
		return err
	})
	if err != nil {
		return netip.Addr{}, err
	}
	defer ln.Close()
	got := make(chan netip.Addr, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(got)
			return
		}
		got <- c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
		c.Close()
	}()
	var lastErr error
	for ctx.Err() == nil {
		err = nlsafe.InNamespace(dialNS, func() error {
			d := net.Dialer{Timeout: time.Second}
			c, err := d.DialContext(ctx, "tcp", ln.Addr().String())
			if err == nil {
				c.Close()
			}
			return err
		})
		if err == nil {
			a, ok := <-got
			if !ok {
				return netip.Addr{}, fmt.Errorf("accept failed")
			}
			return a, nil
		}
		lastErr = err
	}
	ln.Close()
	<-got
	return netip.Addr{}, fmt.Errorf("connect to %s: %w", ln.Addr(), lastErr)
}

func ctxTimeout(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(t.Context(), d)
	t.Cleanup(cancel)
	return ctx
}

func TestMasquerade(t *testing.T) {
	requireTools(t)
	t.Parallel()
	for _, mode := range modes {
		for _, fam := range []string{"ipv4", "ipv6"} {
			t.Run(string(mode)+"/"+fam, func(t *testing.T) {
				t.Parallel()
				v4, v6 := fam == "ipv4", fam == "ipv6"
				lab, pods := twoNodes(t, v4, v6)
				for i, n := range lab.Nodes {
					m := newManager(t, n, Options{Mode: mode, Masquerade: true, Forward: true})
					require.NoError(t, m.Ensure(t.Context(), config(v4, v6), leaseOf(i, v4, v6)))
				}
				rt, err := netns.GetFromName(lab.NSName("rt"))
				require.NoError(t, err)
				defer rt.Close()
				outside, nodeIP, podIP, peerIP := netlab.RouterIP(0), lab.Nodes[0].IP, pods[0].IP, pods[1].IP
				if v6 {
					outside, nodeIP, podIP, peerIP = netlab.RouterIPv6(0), lab.Nodes[0].IPv6, pods[0].IPv6, pods[1].IPv6
				}
				// Outside the cluster network: the node's address.
				src, err := seenFrom(ctxTimeout(t, 20*time.Second), rt, pods[0].NS, outside)
				require.NoError(t, err)
				assert.Equal(t, nodeIP, src, "pod to outside must leave with the node's address")
				// Pod to pod: the pod's own address.
				src, err = seenFrom(ctxTimeout(t, 20*time.Second), pods[1].NS, pods[0].NS, peerIP)
				require.NoError(t, err)
				assert.Equal(t, podIP, src, "pod to pod must keep the pod's address")
			})
		}
	}
}

func TestWithoutMasqueradeOutsideSeesPod(t *testing.T) {
	requireTools(t)
	t.Parallel()
	// The control for TestMasquerade: forward rules only. The router has no
	// route back to the pod, so the connection must not complete.
	lab, pods := twoNodes(t, true, false)
	m := newManager(t, lab.Nodes[0], Options{Mode: ModeNFTables, Forward: true})
	require.NoError(t, m.Ensure(t.Context(), config(true, false), leaseOf(0, true, false)))
	rt, err := netns.GetFromName(lab.NSName("rt"))
	require.NoError(t, err)
	defer rt.Close()
	_, err = seenFrom(ctxTimeout(t, 3*time.Second), rt, pods[0].NS, netlab.RouterIP(0))
	assert.Error(t, err)
	assert.NotContains(t, nsRun(t, lab.Nodes[0].NSName, "nft", "list", "ruleset"), "masquerade")
}

// TestMasqueradeIPv4Only: with NoIPv6Masquerade (K3s without
// --flannel-ipv6-masq) a dual-stack node masquerades IPv4 only; IPv6 pod
// traffic leaves with the pod's address.
func TestMasqueradeIPv4Only(t *testing.T) {
	requireTools(t)
	t.Parallel()
	for _, mode := range modes {
		t.Run(string(mode), func(t *testing.T) {
			t.Parallel()
			lab, pods := twoNodes(t, true, true)
			n := lab.Nodes[0]
			m := newManager(t, n, Options{Mode: mode, Masquerade: true, NoIPv6Masquerade: true, Forward: true})
			require.NoError(t, m.Ensure(t.Context(), config(true, true), leaseOf(0, true, true)))
			rt, err := netns.GetFromName(lab.NSName("rt"))
			require.NoError(t, err)
			defer rt.Close()
			src, err := seenFrom(ctxTimeout(t, 20*time.Second), rt, pods[0].NS, netlab.RouterIP(0))
			require.NoError(t, err)
			assert.Equal(t, n.IP, src, "IPv4 to outside leaves with the node's address")
			// The router has no route back to the pod's IPv6 subnet: an
			// unmasqueraded connection cannot complete.
			_, err = seenFrom(ctxTimeout(t, 3*time.Second), rt, pods[0].NS, netlab.RouterIPv6(0))
			assert.Error(t, err, "IPv6 to outside must not be masqueraded")
			switch mode {
			case ModeNFTables:
				nftOut := nsRun(t, n.NSName, "nft", "list", "table", "ip6", "flannel-ipv6")
				assert.NotContains(t, nftOut, "masquerade")
				assert.Contains(t, nftOut, "accept", "the IPv6 forward rules stay")
				assert.Contains(t, nsRun(t, n.NSName, "nft", "list", "table", "ip", "flannel-ipv4"), "masquerade")
			case ModeIPTables:
				assert.NotContains(t, nsRun(t, n.NSName, "ip6tables-save"), "MASQUERADE")
				assert.Contains(t, nsRun(t, n.NSName, "iptables-save"), "MASQUERADE")
			}
		})
	}
}

// wantRules checks the kernel holds mode's rules for lease i and none of
// the other mode.
func wantRules(t *testing.T, ns string, mode Mode, i int, v4, v6 bool) {
	t.Helper()
	nftOut := nsRun(t, ns, "nft", "list", "ruleset")
	ipt4 := nsRun(t, ns, "iptables-save")
	ipt6 := nsRun(t, ns, "ip6tables-save")
	s4, s6 := subnets(i)
	switch mode {
	case ModeNFTables:
		assert.Equal(t, v4, strings.Contains(nftOut, "table ip flannel-ipv4"), nftOut)
		assert.Equal(t, v6, strings.Contains(nftOut, "table ip6 flannel-ipv6"), nftOut)
		if v4 {
			assert.Contains(t, nftOut, "ip saddr "+s4.String()+" ip daddr 10.244.0.0/16 return")
		}
		if v6 {
			assert.Contains(t, nftOut, "ip6 saddr "+s6.String()+" ip6 daddr fd00:10:244::/56 return")
		}
		assert.NotContains(t, ipt4+ipt6, "FLANNEL")
	case ModeIPTables:
		assert.NotContains(t, nftOut, "flannel-ipv")
		assert.Equal(t, v4, strings.Contains(ipt4, "-A POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG"), ipt4)
		assert.Equal(t, v6, strings.Contains(ipt6, "-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD"), ipt6)
		if v4 {
			assert.Contains(t, ipt4, "-A FLANNEL-POSTRTG -s "+s4.String()+" -d 10.244.0.0/16")
			assert.Equal(t, 6, strings.Count(ipt4, "-A FLANNEL-POSTRTG"), ipt4)
			assert.Equal(t, 2, strings.Count(ipt4, "-A FLANNEL-FWD"), ipt4)
		}
		if v6 {
			assert.Contains(t, ipt6, "-A FLANNEL-POSTRTG -s "+s6.String()+" -d fd00:10:244::/56")
			assert.Equal(t, 6, strings.Count(ipt6, "-A FLANNEL-POSTRTG"), ipt6)
		}
	}
}

func TestEnsureIdempotentAndSubnetChange(t *testing.T) {
	requireTools(t)
	t.Parallel()
	for _, mode := range modes {
		t.Run(string(mode), func(t *testing.T) {
			t.Parallel()
			lab := netlab.NewT(t, netlab.Options{Nodes: 1, IPv4: true, IPv6: true})
			n := lab.Nodes[0]
			m := newManager(t, n, Options{Mode: mode, Masquerade: true, Forward: true})
			ctx := t.Context()
			require.NoError(t, m.Ensure(ctx, config(true, true), leaseOf(3, true, true)))
			wantRules(t, n.NSName, mode, 3, true, true)
			before := dump(t, n.NSName)
			require.NoError(t, m.Ensure(ctx, config(true, true), leaseOf(3, true, true)))
			for _, f := range m.want.fams {
				var changed bool
				require.NoError(t, m.inNS(func() error {
					var err error
					changed, err = m.ensure(ctx, mode, f)
					return err
				}))
				assert.False(t, changed, "a second ensure must write nothing")
			}
			assert.Equal(t, normalize(before), normalize(dump(t, n.NSName)))

			// A new lease (e.g. read from an old subnet.env) replaces the rules.
			require.NoError(t, m.Ensure(ctx, config(true, true), leaseOf(4, true, true)))
			wantRules(t, n.NSName, mode, 4, true, true)
			s4, s6 := subnets(3)
			assert.NotContains(t, dump(t, n.NSName), s4.String())
			assert.NotContains(t, dump(t, n.NSName), s6.String())

			// IPv6 turned off: its rules go.
			require.NoError(t, m.Ensure(ctx, config(true, false), leaseOf(4, true, false)))
			wantRules(t, n.NSName, mode, 4, true, false)
		})
	}
}

func TestRunRepairs(t *testing.T) {
	requireTools(t)
	t.Parallel()
	for _, mode := range modes {
		t.Run(string(mode), func(t *testing.T) {
			t.Parallel()
			lab := netlab.NewT(t, netlab.Options{Nodes: 1, IPv4: true, IPv6: true})
			n := lab.Nodes[0]
			repairs := &countHandler{msg: "traffic rules repaired"}
			m := newManager(t, n, Options{Mode: mode, Masquerade: true, Forward: true, ResyncPeriod: 100 * time.Millisecond, Logger: slog.New(repairs)})
			require.NoError(t, m.Ensure(t.Context(), config(true, true), leaseOf(1, true, true)))
			want := dump(t, n.NSName)
			ctx, cancel := context.WithCancel(t.Context())
			done := make(chan error, 1)
			go func() { done <- m.Run(ctx) }()
			defer func() {
				cancel()
				assert.NoError(t, <-done)
			}()
			breakages := map[Mode][][]string{
				ModeNFTables: {
					{"nft", "flush", "chain", "ip", "flannel-ipv4", "postrtg"},
					{"nft", "delete", "table", "ip6", "flannel-ipv6"},
				},
				ModeIPTables: {
					{"iptables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "2"},
					{"ip6tables", "-t", "filter", "-D", "FORWARD", "-m", "comment", "--comment", "flanneld forward", "-j", "FLANNEL-FWD"},
					{"iptables", "-t", "filter", "-A", "FLANNEL-FWD", "-s", "192.0.2.0/24", "-j", "ACCEPT"},
					// As many rules as ours, one of them another: the
					// listing a check remembered no longer matches.
					{"iptables", "-t", "nat", "-R", "FLANNEL-POSTRTG", "1", "-s", "192.0.2.0/24", "-j", "RETURN"},
				},
			}
			for _, b := range breakages[mode] {
				// The breakage itself is not asserted on the dump: under
				// load Run may repair it before a dump could see it. A
				// repair logged after the breakage proves Run acted.
				before := repairs.n.Load()
				nsRun(t, n.NSName, b...)
				require.Eventually(t, func() bool {
					return repairs.n.Load() > before && normalize(dump(t, n.NSName)) == normalize(want)
				}, 20*time.Second, 100*time.Millisecond, "after %v", b)
			}
			if mode == ModeIPTables {
				// Every chain of ours is remembered as found right, so a
				// check of an unchanged chain lists it once.
				require.Eventually(t, func() bool {
					m.mu.Lock()
					defer m.mu.Unlock()
					return len(m.iptSeen) == 4
				}, 20*time.Second, 100*time.Millisecond, "nat and filter chains of both families")
			}
		})
	}
}

// TestCheckSkipsUnchangedGeneration: while the namespace's nf_tables
// generation stays, Check runs no binary (but every fullCheckEvery-th
// time); a change by hand, which moves it, is repaired at the next Check.
// (iptables is iptables-nft here, as hack/test.sh selects it.)
func TestCheckSkipsUnchangedGeneration(t *testing.T) {
	requireTools(t)
	t.Parallel()
	for _, mode := range modes {
		t.Run(string(mode), func(t *testing.T) {
			t.Parallel()
			lab := netlab.NewT(t, netlab.Options{Nodes: 1, IPv4: true, IPv6: true})
			n := lab.Nodes[0]
			m := newManager(t, n, Options{Mode: mode, Masquerade: true, Forward: true})
			ctx := t.Context()
			require.NoError(t, m.Ensure(ctx, config(true, true), leaseOf(1, true, true)))
			want := normalize(dump(t, n.NSName))
			full := func() int {
				m.mu.Lock()
				defer m.mu.Unlock()
				return m.gen.fullChecks
			}
			require.NoError(t, m.Check(ctx))
			require.Equal(t, 1, full(), "the first check after Ensure runs the binaries")
			for range 3 {
				require.NoError(t, m.Check(ctx))
			}
			assert.Equal(t, 1, full(), "nothing changed: no binary run")

			breakage := map[Mode][]string{
				ModeNFTables: {"nft", "flush", "chain", "ip", "flannel-ipv4", "postrtg"},
				ModeIPTables: {"iptables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "2"},
			}[mode]
			nsRun(t, n.NSName, breakage...)
			require.NoError(t, m.Check(ctx))
			assert.Equal(t, 2, full(), "the generation moved: checked")
			assert.Equal(t, want, normalize(dump(t, n.NSName)), "and repaired")
			require.NoError(t, m.Check(ctx))
			assert.Equal(t, 3, full(), "the repair moved it too: confirmed once")

			// Unchanged for fullCheckEvery checks: the binaries run once.
			for range fullCheckEvery {
				require.NoError(t, m.Check(ctx))
			}
			assert.Equal(t, 4, full(), "a full check at least every %d", fullCheckEvery)

			// A change elsewhere in the ruleset moves the generation too.
			nsRun(t, n.NSName, "nft", "add", "table", "inet", "someone-else")
			require.NoError(t, m.Check(ctx))
			assert.Equal(t, 5, full())
		})
	}
}

// normalize drops what a rewrite changes without changing meaning: nft
// handles and iptables-save's header, counters and timestamps.
func normalize(s string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, "#") {
			continue
		}
		if strings.HasPrefix(l, ":") {
			if i := strings.Index(l, " ["); i > 0 {
				l = l[:i]
			}
		}
		out = append(out, l)
	}
	return strings.Join(out, "\n")
}

func TestSwitchModes(t *testing.T) {
	requireTools(t)
	t.Parallel()
	lab := netlab.NewT(t, netlab.Options{Nodes: 1, IPv4: true, IPv6: true})
	n := lab.Nodes[0]
	ctx := t.Context()
	// Auto mode follows the config's EnableNFTables.
	m := newManager(t, n, Options{Masquerade: true, Forward: true})
	cfg := config(true, true)
	for _, nft := range []bool{false, true, false} {
		cfg.EnableNFTables = nft
		require.NoError(t, m.Ensure(ctx, cfg, leaseOf(2, true, true)))
		wantRules(t, n.NSName, m.ModeFor(cfg), 2, true, true)
	}
	// A manager of the other mode (a restart with another setting).
	m2 := newManager(t, n, Options{Mode: ModeNFTables, Masquerade: true})
	require.NoError(t, m2.Ensure(ctx, cfg, leaseOf(2, true, true)))
	wantRules(t, n.NSName, ModeNFTables, 2, true, true)
	assert.NotContains(t, nsRun(t, n.NSName, "nft", "list", "ruleset"), "chain forward", "forward rules are off in this manager")
}

func TestCleanupLeavesForeignRules(t *testing.T) {
	requireTools(t)
	t.Parallel()
	lab := netlab.NewT(t, netlab.Options{Nodes: 1, IPv4: true, IPv6: true})
	n := lab.Nodes[0]
	ns := n.NSName
	// Someone else's rules, in both tools and in the tables we use.
	nsRun(t, ns, "nft", "add table ip other; add chain ip other post { type nat hook postrouting priority 100; }; add rule ip other post ip saddr 192.0.2.0/24 masquerade")
	nsRun(t, ns, "iptables", "-t", "nat", "-N", "KUBE-POSTROUTING")
	nsRun(t, ns, "iptables", "-t", "nat", "-A", "POSTROUTING", "-j", "KUBE-POSTROUTING")
	nsRun(t, ns, "iptables", "-t", "filter", "-A", "FORWARD", "-s", "192.0.2.0/24", "-j", "ACCEPT")
	nsRun(t, ns, "ip6tables", "-t", "filter", "-A", "FORWARD", "-d", "2001:db8::/32", "-j", "DROP")
	foreign := normalize(dump(t, ns))

	ctx := t.Context()
	for _, mode := range modes {
		m, err := New(Options{NS: n.NS, Mode: mode, Masquerade: true, Forward: true})
		require.NoError(t, err)
		require.NoError(t, m.Ensure(ctx, config(true, true), leaseOf(5, true, true)))
	}
	// Only the last mode remains; now both are removed.
	m, err := New(Options{NS: n.NS})
	require.NoError(t, err)
	require.NoError(t, m.Cleanup(ctx))
	after := dump(t, ns)
	assert.NotContains(t, after, "flannel")
	assert.NotContains(t, after, "FLANNEL")
	// iptables-nft leaves the (now empty) base tables it created; compare
	// the foreign rules themselves.
	for _, l := range strings.Split(foreign, "\n") {
		if strings.HasPrefix(l, "-A") || strings.Contains(l, "192.0.2.0/24") || strings.Contains(l, "table ip other") {
			assert.Contains(t, after, l)
		}
	}
	require.NoError(t, m.Cleanup(ctx), "cleanup again")
}

func TestCleanupWithoutBinaries(t *testing.T) {
	testenv.RequireRoot(t)
	// A node without nft or iptables installed has nothing of ours to
	// remove. PATH is process-wide: not parallel.
	lab := netlab.NewT(t, netlab.Options{Nodes: 1})
	t.Setenv("PATH", t.TempDir())
	m, err := New(Options{NS: lab.Nodes[0].NS})
	require.NoError(t, err)
	assert.NoError(t, m.Cleanup(t.Context()))
	err = m.Ensure(t.Context(), config(true, false), leaseOf(1, true, false))
	assert.ErrorIs(t, err, exec.ErrNotFound)
}

// countHandler counts log records whose message is msg.
type countHandler struct {
	msg string
	n   atomic.Int64
}

func (h *countHandler) Enabled(context.Context, slog.Level) bool { return true }
func (h *countHandler) Handle(_ context.Context, r slog.Record) error {
	if r.Message == h.msg {
		h.n.Add(1)
	}
	return nil
}
func (h *countHandler) WithAttrs([]slog.Attr) slog.Handler { return h }
func (h *countHandler) WithGroup(string) slog.Handler      { return h }
