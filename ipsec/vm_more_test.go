package ipsec_test

import (
	"context"
	"errors"
	"math/rand/v2"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"
	"go.uber.org/goleak"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/internal/vmlab"
	"github.com/flannelkit/flannel/ipsec"
	"github.com/flannelkit/flannel/lease"
)

// runAll runs every node's Network.Run until the returned stop is called;
// stop waits for them to return.
func (c *vcluster) runAll() (stop func()) {
	ctx, cancel := context.WithCancel(c.t.Context())
	var wg sync.WaitGroup
	for i, v := range c.nodes {
		if c.gone[i] {
			continue
		}
		n := v.net
		wg.Go(func() { assert.NoError(c.t, n.Run(ctx)) })
	}
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); wg.Wait() }) }
	c.t.Cleanup(stop)
	return stop
}

func TestInVMStatesDeletedByHand(t *testing.T) {
	inVM(t)
	ignore := goleak.IgnoreCurrent()
	c := newCluster(t, 2, func(int) string { return clusterPSK }, ipsec.Options{RepairInterval: 300 * time.Millisecond})
	marker := []byte("PLAINTEXT-MARKER-DELETED-" + time.Now().String())
	capt := startCapture(t, c.lab, marker)
	c.applyOK()
	c.checkAllPairs()

	n0 := c.nodes[0].node.Handle
	outSPI := func() int {
		for _, s := range xfrmStates(t, n0) {
			if s.Src.Equal(c.nodes[0].node.IP.AsSlice()) {
				return s.Spi
			}
		}
		return 0
	}
	before := outSPI()
	require.NotZero(t, before)
	require.NoError(t, n0.XfrmStateFlush(0))
	require.Empty(t, xfrmStates(t, n0))
	// Dropped, not sent in clear.
	err := sendMarker(t, c.nodes[0].pod, c.nodes[1].pod, marker, 2*time.Second)
	assert.Error(t, err, "traffic must not pass without states")

	// Run repairs.
	stop := c.runAll()
	require.NoError(t, sendMarkerEventually(t, c.nodes[0].pod, c.nodes[1].pod, marker, 30*time.Second))
	assert.Len(t, xfrmStates(t, n0), perPeer)
	assert.NotEqual(t, before, outSPI(), "the outbound state came back as a new generation, not with its old key")
	stop()
	capt.stop()
	assert.Zero(t, capt.plain.Load(), "plain-text marker on the wire; first frame: %s", capt.first)
	goleak.VerifyNone(t, ignore)
	c.checkLogsFree()
}

func sendMarkerEventually(t *testing.T, a, b *netlab.Pod, marker []byte, within time.Duration) error {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := sendMarker(t, a, b, marker, 2*time.Second)
		if err == nil || time.Now().After(deadline) {
			return err
		}
	}
}

func ourStatesTo(t *testing.T, h *netlink.Handle, ip netip.Addr) int {
	n := 0
	for _, s := range xfrmStates(t, h) {
		if s.Dst.Equal(ip.AsSlice()) || s.Src.Equal(ip.AsSlice()) {
			n++
		}
	}
	return n
}

// TestInVMPeerRemovedAndStale: a restarted node removes XFRM entries of a
// previous run (our reqid) and leaves someone else's alone. (A peer that
// leaves is the contract suite's StaleEntriesRemoved.)
func TestInVMPeerRemovedAndStale(t *testing.T) {
	inVM(t)
	c := newCluster(t, 2, func(int) string { return clusterPSK }, ipsec.Options{})
	c.applyOK()
	h0 := c.nodes[0].node.Handle

	// Leftovers of a previous run (our reqid) and someone else's state.
	key := make([]byte, 20)
	stale := &netlink.XfrmState{Src: c.nodes[0].node.IP.AsSlice(), Dst: net.ParseIP("172.30.0.99"), Proto: netlink.XFRM_PROTO_ESP,
		Mode: netlink.XFRM_MODE_TUNNEL, Spi: 0x1234, Reqid: ipsec.DefaultReqid,
		Aead: &netlink.XfrmStateAlgo{Name: "rfc4106(gcm(aes))", Key: key, ICVLen: 128}}
	foreign := *stale
	foreign.Spi, foreign.Reqid = 0x4321, 7
	require.NoError(t, h0.XfrmStateAdd(stale))
	require.NoError(t, h0.XfrmStateAdd(&foreign))
	stalePol := &netlink.XfrmPolicy{
		Src: ipconv.IPNetFromPrefix(c.nodes[0].lease.Subnet), Dst: ipconv.IPNetFromPrefix(netip.MustParsePrefix("10.244.99.0/24")),
		Dir: netlink.XFRM_DIR_OUT, Priority: 0x66c1,
		Tmpls: []netlink.XfrmPolicyTmpl{{Src: c.nodes[0].node.IP.AsSlice(), Dst: net.ParseIP("172.30.0.99"), Proto: netlink.XFRM_PROTO_ESP, Mode: netlink.XFRM_MODE_TUNNEL, Reqid: ipsec.DefaultReqid}},
	}
	require.NoError(t, h0.XfrmPolicyAdd(stalePol))

	// A restarted node 0 (fresh key) removes them at its first Apply.
	c.start(0)
	c.applyOK()
	var spisNow []int
	for _, s := range xfrmStates(t, h0) {
		spisNow = append(spisNow, s.Spi)
	}
	assert.NotContains(t, spisNow, 0x1234, "stale state of ours removed")
	assert.Contains(t, spisNow, 0x4321, "foreign state left alone")
	assert.Len(t, xfrmPolicies(t, h0), closedPols+peerPols, "stale policy removed")
	require.NoError(t, c.nodes[0].pod.Ping(ctxT(t, 20*time.Second), c.nodes[1].pod.IP))
	c.checkLogsFree()
}

func TestInVMWrongPSK(t *testing.T) {
	inVM(t)
	c := newCluster(t, 3, func(i int) string {
		if i == 2 {
			return otherPSK
		}
		return clusterPSK
	}, ipsec.Options{})
	marker := []byte("PLAINTEXT-MARKER-WRONGPSK-" + time.Now().String())
	capt := startCapture(t, c.lab, marker)
	errs := c.apply()
	for i, err := range errs {
		require.Error(t, err, "node %d", i)
		var pe *flannel.PeerError
		require.True(t, errors.As(err, &pe), "node %d: %v", i, err)
		assert.ErrorIs(t, err, ipsec.ErrPeerAuth, "node %d", i)
	}
	assert.Len(t, flattenErr(errs[2]), 2, "node 2 cannot use either peer")
	assert.Len(t, flattenErr(errs[0]), 1, "node 0 only lacks node 2")
	assert.Contains(t, c.nodes[2].logs.String(), "not authenticated with this cluster's PSK")

	// The others keep working; node 2 reaches no one and nothing leaks.
	require.NoError(t, c.nodes[0].pod.Ping(ctxT(t, 20*time.Second), c.nodes[1].pod.IP))
	require.NoError(t, c.nodes[1].pod.TCPCheck(ctxT(t, 20*time.Second), c.nodes[0].pod, c.nodes[0].pod.IP))
	assert.Error(t, c.nodes[2].pod.Ping(ctxT(t, 2*time.Second), c.nodes[0].pod.IP))
	assert.Error(t, sendMarker(t, c.nodes[2].pod, c.nodes[0].pod, marker, 2*time.Second))
	assert.Error(t, sendMarker(t, c.nodes[0].pod, c.nodes[2].pod, marker, 2*time.Second))
	capt.stop()
	assert.Zero(t, capt.plain.Load(), "plain-text marker on the wire; first frame: %s", capt.first)
	c.checkLogsFree()
}

func flattenErr(err error) []error {
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		return j.Unwrap()
	}
	return []error{err}
}

// rekeyRun is two running nodes with a UDP probe from pod 0 to pod 1, where
// node 1 has rekeyed and its new attributes are not yet published.
type rekeyRun struct {
	c      *vcluster
	stop   func()
	h1     *netlink.Handle
	before map[int]bool // node 1's SPIs before the rekey
	probe  *vmlab.UDPProbe
	attrs  lease.Attrs
}

// startRekey builds and runs the nodes with opts (setup, when set, runs
// before the first Apply), starts the probe and rekeys node 1.
func startRekey(t *testing.T, opts ipsec.Options, setup func(*vcluster)) *rekeyRun {
	t.Helper()
	c := newCluster(t, 2, func(int) string { return clusterPSK }, opts)
	if setup != nil {
		setup(c)
	}
	c.applyOK()
	c.checkAllPairs()
	r := &rekeyRun{c: c, stop: c.runAll(), h1: c.nodes[1].node.Handle}
	r.before = spis(t, r.h1)
	r.probe = vmlab.StartUDPProbe(t, c.nodes[0].pod, c.nodes[1].pod, 20*time.Millisecond)
	r.probe.WaitAnswers(t, 10)
	var err error
	r.attrs, err = c.nodes[1].net.(*ipsec.Network).Rekey(t.Context())
	require.NoError(t, err)
	return r
}

// publish hands node 1's new attributes to node 0 (the store's job).
func (r *rekeyRun) publish() {
	r.c.nodes[1].lease.Attrs = r.attrs
	r.c.applyOK()
}

// waitRetired waits until node 1 holds only the states of its new key.
func (r *rekeyRun) waitRetired(t *testing.T, within time.Duration) {
	t.Helper()
	require.Eventually(t, func() bool { return len(spis(t, r.h1)) == perPeer }, within, 100*time.Millisecond, "old key retired once node 0 uses the new one")
}

// finish stops the probe and the nodes, and checks that every datagram
// was answered and that no SPI of node 1 survived the rekey.
func (r *rekeyRun) finish(t *testing.T) {
	t.Helper()
	r.probe.Stop()
	r.stop()
	t.Logf("udp probe: sent %d, answered %d", r.probe.Sent.Load(), r.probe.Got.Load())
	assert.Positive(t, r.probe.Sent.Load())
	assert.Equal(t, r.probe.Sent.Load(), r.probe.Got.Load(), "datagrams lost during the rekey: %v", r.probe.Missing())
	after := spis(t, r.h1)
	assert.Len(t, after, perPeer)
	for s := range after {
		assert.False(t, r.before[s], "SPI %#x survived the rekey", s)
	}
	r.c.checkLogsFree()
}

// TestInVMRekeyUnseen: node 1 rekeys but its new key does not reach node 0
// (a store outage). Node 0 keeps sending with the old key, so node 1 keeps
// accepting it and keeps sending with it too, however long that lasts: no
// datagram is lost. Once the key arrives, both switch and the old key is
// retired.
func TestInVMRekeyUnseen(t *testing.T) {
	inVM(t)
	ignore := goleak.IgnoreCurrent()
	grace := 3 * time.Second
	r := startRekey(t, ipsec.Options{Grace: grace, RepairInterval: 500 * time.Millisecond}, nil)
	// Not published: two grace periods of probe traffic (at least; the
	// probe sends every 20ms) pass with node 0 unaware.
	r.probe.WaitAnswers(t, int64(2*grace/(20*time.Millisecond)))
	assert.Greater(t, len(spis(t, r.h1)), perPeer, "the old key is still installed while node 0 sends with it")
	r.probe.WaitAnswers(t, 10) // traffic flows while the new key is unseen

	// The key arrives: node 0 switches, node 1 sees it and retires the old key.
	r.publish()
	r.waitRetired(t, 10*grace)
	r.probe.WaitAnswers(t, 10) // and on the new key only
	r.finish(t)
	goleak.VerifyNone(t, ignore)
}

func TestInVMRekeyWithoutLoss(t *testing.T) {
	inVM(t)
	ignore := goleak.IgnoreCurrent()
	grace := 3 * time.Second
	marker := []byte("PLAINTEXT-MARKER-REKEY-" + time.Now().String())
	var capt *capture
	r := startRekey(t, ipsec.Options{Grace: grace, RepairInterval: time.Second}, func(c *vcluster) {
		capt = startCapture(t, c.lab, marker)
	})
	c := r.c
	r.publish()
	require.NoError(t, sendMarker(t, c.nodes[0].pod, c.nodes[1].pod, marker, 5*time.Second))
	// The old key goes once node 0 sends with the new one and Grace has
	// passed (outbound switch and retirement).
	r.waitRetired(t, 10*grace)
	require.NoError(t, sendMarker(t, c.nodes[1].pod, c.nodes[0].pod, marker, 5*time.Second))
	// The old key goes once node 0 sends with the new one and Grace has
	// passed; a replaced outbound state lingers a moment longer.
	r.waitRetired(t, 10*grace)
	r.finish(t)
	capt.stop()
	assert.Zero(t, capt.plain.Load(), "plain-text marker on the wire; first frame: %s", capt.first)
	goleak.VerifyNone(t, ignore)
}

func TestInVMRestartWhileTrafficFlows(t *testing.T) {
	inVM(t)
	c := newCluster(t, 2, func(int) string { return clusterPSK }, ipsec.Options{})
	marker := []byte("PLAINTEXT-MARKER-RESTART-" + time.Now().String())
	capt := startCapture(t, c.lab, marker)
	c.applyOK()
	c.checkAllPairs()
	h1 := c.nodes[1].node.Handle
	before := spis(t, h1)
	oldKey := c.nodes[1].net.(*ipsec.Network).PublicKey()

	// Marker traffic both ways all along; each phase lasts until both
	// directions made another attempt.
	ctx, cancel := context.WithCancel(t.Context())
	var wg sync.WaitGroup
	var tries [2]atomic.Int64
	for i, dir := range [][2]int{{0, 1}, {1, 0}} {
		wg.Go(func() {
			for ctx.Err() == nil {
				_ = sendMarker(t, c.nodes[dir[0]].pod, c.nodes[dir[1]].pod, marker, 300*time.Millisecond)
				tries[i].Add(1)
			}
		})
	}
	phase := func() {
		t.Helper()
		a, b := tries[0].Load(), tries[1].Load()
		require.Eventually(t, func() bool { return tries[0].Load() > a && tries[1].Load() > b }, 30*time.Second, 10*time.Millisecond)
	}
	phase()
	// Node 1's agent restarts: fresh key, its old states still in place
	// until its first Apply; node 0 sees the new lease afterwards.
	c.start(1)
	require.NoError(t, c.nodes[1].net.Apply(t.Context(), []lease.Lease{c.nodes[0].lease}))
	phase()
	c.applyOK()
	phase()
	cancel()
	wg.Wait()

	require.NoError(t, sendMarkerEventually(t, c.nodes[0].pod, c.nodes[1].pod, marker, 20*time.Second))
	require.NoError(t, sendMarkerEventually(t, c.nodes[1].pod, c.nodes[0].pod, marker, 20*time.Second))
	capt.stop()
	assert.NotEqual(t, oldKey, c.nodes[1].net.(*ipsec.Network).PublicKey())
	after := spis(t, h1)
	assert.Len(t, after, perPeer)
	for s := range after {
		assert.False(t, before[s], "SPI %#x survived the restart", s)
	}
	assert.Positive(t, capt.esp.Load())
	assert.Zero(t, capt.plain.Load(), "plain-text marker on the wire; first frame: %s", capt.first)
	c.checkLogsFree()
}

// TestInVMRekeyByRun lets Network.Run rekey on its interval and publish
// through Options.Publish; the test plays the store.
func TestInVMRekeyByRun(t *testing.T) {
	inVM(t)
	published := make(chan lease.Attrs, 4)
	c := newCluster(t, 2, func(int) string { return clusterPSK }, ipsec.Options{Grace: 2 * time.Second})
	// Node 1 again, with a rekey interval and a publisher.
	c.nodes[1].opts.RekeyInterval = time.Second
	c.nodes[1].opts.Publish = func(a lease.Attrs) {
		select {
		case published <- a:
		default:
		}
	}
	c.start(1)
	select { // Start's: the key bound to the lease (c.start took it from Lease)
	case <-published:
	default:
		t.Fatal("Start did not publish the key bound to its lease")
	}
	c.applyOK()
	first := c.nodes[1].net.(*ipsec.Network).PublicKey()
	stop := c.runAll()
	for range 2 {
		select {
		case a := <-published:
			c.nodes[1].lease.Attrs = a
			c.applyOK()
		case <-time.After(30 * time.Second):
			t.Fatal("no rekey published")
		}
	}
	assert.NotEqual(t, first, c.nodes[1].net.(*ipsec.Network).PublicKey())
	c.checkAllPairs()
	stop()
	c.checkLogsFree()
}

// TestInVMRandomPeerSets applies random sets of invented peers in random
// order; after each Apply the kernel holds exactly the last set's states,
// policies and routes.
func TestInVMRandomPeerSets(t *testing.T) {
	inVM(t)
	c := newCluster(t, 1, func(int) string { return clusterPSK }, ipsec.Options{})
	v := c.nodes[0]
	var pool []lease.Lease
	for i := range 6 {
		l := lease.Lease{
			Subnet: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(100 + i), 0}), 24),
			Attrs:  lease.Attrs{BackendType: ipsec.Type, PublicIP: netip.AddrFrom4([4]byte{172, 30, 0, byte(100 + i)})},
		}
		pool = append(pool, l)
	}
	// A peer that returns comes with a new key (a restart): with its old
	// one, our outbound state to it would take its next generation each
	// time, and none after the last.
	epochs := make([]uint64, len(pool))
	in := make([]bool, len(pool))
	rng := rand.New(rand.NewPCG(1, 2))
	for step := range 12 {
		var set []lease.Lease
		for i, l := range pool {
			was := in[i]
			in[i] = rng.IntN(2) == 0
			if !in[i] {
				continue
			}
			if !was {
				epochs[i]++
				var err error
				pool[i].Attrs.BackendData, err = ipsec.FakePeerData([]byte(clusterPSK), l, epochs[i])
				require.NoError(t, err)
			}
			set = append(set, pool[i])
		}
		rng.Shuffle(len(set), func(i, j int) { set[i], set[j] = set[j], set[i] })
		require.NoError(t, v.net.Apply(t.Context(), set), "step %d", step)
		assert.Len(t, xfrmStates(t, v.node.Handle), perPeer*len(set), "step %d", step)
		assert.Len(t, xfrmPolicies(t, v.node.Handle), closedPols+peerPols*len(set), "step %d", step)
		routes, err := nlsafe.Wrap(v.node.Handle).RouteListFiltered(netlink.FAMILY_V4, &netlink.Route{Protocol: backend.RouteProtocol}, netlink.RT_FILTER_PROTOCOL)
		require.NoError(t, err)
		assert.Len(t, routes, len(set), "step %d", step)
		for _, l := range set {
			assert.Equal(t, perPeer, ourStatesTo(t, v.node.Handle, l.Attrs.PublicIP), "step %d peer %s", step, l)
		}
	}
}
