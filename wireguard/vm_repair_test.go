package wireguard_test

import (
	"context"
	"encoding/base64"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
	"golang.zx2c4.com/wireguard/wgctrl/wgtypes"

	"github.com/flannelkit/flannel/internal/vmlab"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/wireguard"
)

// runAll runs every node's Network.Run until the returned stop is called;
// stop waits for them to return.
func (c *wcluster) runAll() (stop func()) {
	ctx, cancel := context.WithCancel(c.t.Context())
	var wg sync.WaitGroup
	for i, v := range c.nodes {
		if !c.gone[i] {
			n := v.net
			wg.Go(func() { assert.NoError(c.t, n.Run(ctx)) })
		}
	}
	var once sync.Once
	stop = func() { once.Do(func() { cancel(); wg.Wait() }) }
	c.t.Cleanup(stop)
	return stop
}

// TestInVMRestart: an agent killed and restarted with its key file loses
// no datagram at 100/s and publishes the same key; restarted without the
// key file it publishes a new one, and traffic flows again once the peer
// has seen it.
func TestInVMRestart(t *testing.T) {
	inVM(t)
	ignore := goleak.IgnoreCurrent()
	c := newCluster(t, 2, ipv4, "", 0)
	c.applyOK()
	c.checkAllPairs()
	v0, v1 := c.nodes[0], c.nodes[1]
	oldKey, oldAttrs := v1.net.PublicKey(), v1.lease.Attrs

	stop := c.runAll()
	probe := vmlab.StartUDPProbe(t, v0.pod, v1.pod, 10*time.Millisecond)
	time.Sleep(500 * time.Millisecond)
	stop() // node 1's agent dies (and node 0's Run with it): nothing is cleaned up
	time.Sleep(300 * time.Millisecond)
	c.start(1) // a new process: a new Backend with the same key file
	assert.Equal(t, oldKey, v1.net.PublicKey(), "the key survives the restart")
	assert.Equal(t, string(oldAttrs.BackendData), string(v1.lease.Attrs.BackendData), "the published data is unchanged")
	require.NoError(t, v1.net.Apply(t.Context(), c.peersOf(1)))
	stop = c.runAll()
	time.Sleep(500 * time.Millisecond)
	probe.Stop()
	t.Logf("udp probe across the restart: sent %d, answered %d", probe.Sent.Load(), probe.Got.Load())
	assert.Greater(t, probe.Sent.Load(), int64(50))
	assert.Equal(t, probe.Sent.Load(), probe.Got.Load(), "datagrams lost across the restart")
	stop()

	// The key file deleted: a new key, published; node 0 picks it up.
	require.NoError(t, os.Remove(v1.keyFile))
	c.start(1)
	newKey := v1.net.PublicKey()
	assert.NotEqual(t, oldKey, newKey)
	assert.Contains(t, string(v1.lease.Attrs.BackendData), newKey)
	require.NoError(t, v1.net.Apply(t.Context(), c.peersOf(1)))
	seen := time.Now()
	require.NoError(t, v0.net.Apply(t.Context(), c.peersOf(0))) // the store watch delivers node 1's new lease
	require.NoError(t, v0.pod.Ping(ctxT(t, 20*time.Second), v1.pod.IP))
	t.Logf("new key: node 0 reaches node 1's pod %v after it saw the new lease", time.Since(seen).Round(time.Millisecond))
	require.NoError(t, v1.pod.Ping(ctxT(t, 20*time.Second), v0.pod.IP))
	assert.Equal(t, []string{newKey}, c.peerKeys(0, wireguard.DeviceName), "the old key's peer is gone")
	c.checkLogsFree("")
	goleak.VerifyNone(t, ignore)
}

// TestInVMDeviceDeletedLogged: a deleted device comes back from the
// kernel's notification alone (the periodic repair an hour away), with its
// peer, and the log says what happened. (The repair of every damage is
// the contract suite's: TestInVMContract.)
func TestInVMDeviceDeletedLogged(t *testing.T) {
	inVM(t)
	ignore := goleak.IgnoreCurrent()
	c := newCluster(t, 2, ipv4, "", time.Hour)
	c.applyOK()
	stop := c.runAll()
	h0 := c.nodes[0].node.Handle
	link, err := h0.LinkByName(wireguard.DeviceName)
	require.NoError(t, err)
	require.NoError(t, h0.LinkDel(link))
	require.Eventually(t, func() bool {
		d, err := wireguard.ReadDevice(c.nodes[0].node.NS, wireguard.DeviceName)
		return err == nil && len(d.Peers) == 1
	}, 20*time.Second, 20*time.Millisecond, "device recreated with its peer")
	stop()
	assert.Contains(t, c.nodes[0].logs.String(), "device was deleted")
	goleak.VerifyNone(t, ignore)
}

// TestInVMPeerDeletedRepaired: a peer removed by hand (WireGuard sends no
// notification for it) comes back at the periodic repair.
func TestInVMPeerDeletedRepaired(t *testing.T) {
	inVM(t)
	c := newCluster(t, 2, ipv4, "", 300*time.Millisecond)
	c.applyOK()
	stop := c.runAll()
	ns0 := c.nodes[0].node.NS
	k, err := wgtypes.ParseKey(c.nodes[1].net.PublicKey())
	require.NoError(t, err)
	require.NoError(t, wireguard.ConfigureDevice(ns0, wireguard.DeviceName, wgtypes.Config{Peers: []wgtypes.PeerConfig{{PublicKey: k, Remove: true}}}))
	require.Eventually(t, func() bool { return len(c.peerKeys(0, wireguard.DeviceName)) == 1 }, 20*time.Second, 20*time.Millisecond, "peer restored")
	c.checkAllPairs()
	stop()
}

// TestInVMStalePeersAndChanges: a changed endpoint is updated in place,
// and keepalive and PSK reach the kernel. (Stale peers, of a node that
// left or a previous run, are the contract suite's: TestInVMContract.)
func TestInVMStalePeersAndChanges(t *testing.T) {
	inVM(t)
	psk := base64.StdEncoding.EncodeToString([]byte("0123456789abcdef0123456789abcdef"))
	c := newCluster(t, 2, ipv4, `"PersistentKeepaliveInterval":25,"PSK":"`+psk+`"`, 0)
	c.applyOK()
	c.checkAllPairs()
	ns0 := c.nodes[0].node.NS
	d, err := wireguard.ReadDevice(ns0, wireguard.DeviceName)
	require.NoError(t, err)
	require.Len(t, d.Peers, 1)
	for _, p := range d.Peers {
		assert.Equal(t, 25*time.Second, p.PersistentKeepaliveInterval)
		assert.Equal(t, psk, p.PresharedKey.String())
	}

	// Node 1 publishes another port: the peer's endpoint changes in place.
	v1 := c.nodes[1]
	orig := v1.lease
	v1.lease.Attrs.BackendData = []byte(fmt.Sprintf(`{"PublicKey":%q,"Port":51999}`, v1.net.PublicKey()))
	require.NoError(t, c.nodes[0].net.Apply(t.Context(), c.peersOf(0)))
	d, err = wireguard.ReadDevice(ns0, wireguard.DeviceName)
	require.NoError(t, err)
	require.Len(t, d.Peers, 1)
	assert.Equal(t, netip.AddrPortFrom(v1.node.IP, 51999), d.Peers[0].Endpoint.AddrPort())
	v1.lease = orig
	c.applyOK()
	c.checkAllPairs()
	c.checkLogsFree(psk)
}

// TestInVMRandomPeerSets applies random sets of invented peers in random
// order; after each Apply the device holds exactly the last set's peers.
func TestInVMRandomPeerSets(t *testing.T) {
	inVM(t)
	c := newCluster(t, 1, ipv4, "", 0)
	v := c.nodes[0]
	var pool []lease.Lease
	keys := map[string]string{} // subnet -> key
	for i := range 8 {
		priv, err := wgtypes.GeneratePrivateKey()
		require.NoError(t, err)
		sub := netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(100 + i), 0}), 24)
		keys[sub.String()] = priv.PublicKey().String()
		pool = append(pool, lease.Lease{Subnet: sub, Attrs: lease.Attrs{
			BackendType: wireguard.Type, PublicIP: netip.AddrFrom4([4]byte{172, 30, 0, byte(100 + i)}),
			BackendData: []byte(fmt.Sprintf(`{"PublicKey":%q,"Port":51820}`, priv.PublicKey().String())),
		}})
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for step := range 12 {
		var set []lease.Lease
		var want []string
		for _, l := range pool {
			if rng.IntN(2) == 0 {
				set = append(set, l)
				want = append(want, keys[l.Subnet.String()])
			}
		}
		rng.Shuffle(len(set), func(i, j int) { set[i], set[j] = set[j], set[i] })
		require.NoError(t, v.net.Apply(t.Context(), set), "step %d", step)
		assert.ElementsMatch(t, want, c.peerKeys(0, wireguard.DeviceName), "step %d", step)
	}
}
