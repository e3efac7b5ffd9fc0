package ipsec_test

import (
	"log/slog"
	"net"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/internal/vmlab"
	"github.com/flannelkit/flannel/ipsec"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/memstore"
)

// agentLab is a lab whose nodes run real Agents with the ipsec backend,
// sharing an in-memory store, each with one pod in its subnet.
type agentLab struct {
	lab    *netlab.Lab
	store  *memstore.Store
	logs   *testenv.LogBuffer
	agents []*flannel.Agent
	pods   []*netlab.Pod
}

// startAgents starts an Agent per node of a new lab for netConf and waits
// until each is ready with every peer programmed. Cleanup stops them, joins
// their goroutines and checks for leaks.
func startAgents(t *testing.T, nodes int, netConf string) *agentLab {
	t.Helper()
	l := &agentLab{lab: netlab.NewT(t, netlab.Options{Nodes: nodes}), logs: &testenv.LogBuffer{}}
	cfg, err := lease.ParseConfig([]byte(netConf))
	require.NoError(t, err)
	l.store = memstore.New(cfg, memstore.Options{})
	l.agents, l.pods = vmlab.StartAgents(t, vmlab.Agents{
		Lab: l.lab, Store: l.store, Ready: 60 * time.Second,
		Logs: l.logs, Logger: slog.New(slog.NewJSONHandler(l.logs, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Backend: func(*netlab.Node) (flannel.Backend, error) { return ipsec.FromConfig(cfg) },
	})
	return l
}

// TestInVMAgents runs the ipsec backend under real Agents sharing an
// in-memory store, as examples/cluster -backend ipsec does.
func TestInVMAgents(t *testing.T) {
	inVM(t)
	l := startAgents(t, 3, `{"Network":"10.244.0.0/16","Backend":{"Type":"ipsec","PSK":"`+clusterPSK+`"}}`)
	lab, pods, logs := l.lab, l.pods, l.logs
	for _, a := range l.agents {
		assert.Equal(t, 1446, a.State().MTU)
	}
	vmlab.CheckPairs(t, pods, 20*time.Second)
	for _, n := range lab.Nodes {
		assert.Len(t, xfrmStates(t, n.Handle), 2*perPeer)
	}
	assert.NotContains(t, logs.String(), clusterPSK)
}

func TestInVMUDPEncap(t *testing.T) {
	inVM(t)
	c := newCluster(t, 2, func(int) string { return clusterPSK }, ipsec.Options{UDPEncap: true})
	marker := []byte("PLAINTEXT-MARKER-ENCAP-" + time.Now().String())
	capt := startCapture(t, c.lab, marker)
	stop := c.runAll() // holds the port 4500 sockets
	c.applyOK()
	c.checkAllPairs()
	require.NoError(t, sendMarker(t, c.nodes[0].pod, c.nodes[1].pod, marker, 10*time.Second))
	stop()
	// What the wire carries when the receiver does not decrypt: the
	// marker must not be readable in it.
	require.NoError(t, c.nodes[1].node.Handle.XfrmStateFlush(0))
	inESP := capt.markerInESP.Load()
	sent := capt.udpESP.Load()
	sendUDPMarker(t, c.nodes[0].pod, c.nodes[1].pod, marker, 5)
	require.Eventually(t, func() bool { return capt.udpESP.Load() >= sent+5 }, 20*time.Second, 20*time.Millisecond, "the marker went out as ESP in UDP")
	assert.Equal(t, inESP, capt.markerInESP.Load(), "marker readable in ESP-in-UDP frames nobody decrypted")
	t.Logf("ESP-in-UDP frames %d, of which read back decrypted by the receiver: %d", capt.udpESP.Load(), capt.markerInESP.Load())
	capt.stop()
	assert.Equal(t, 1438, c.nodes[0].net.MTU())
	assert.Positive(t, capt.udpESP.Load(), "ESP in UDP 4500 on the wire")
	assert.Zero(t, capt.esp.Load(), "no bare ESP with UDPEncap")
	assert.Zero(t, capt.plain.Load(), "plain-text marker on the wire; first frame: %s", capt.first)
}

// sendUDPMarker sends marker n times in UDP datagrams from a to b (port 9).
func sendUDPMarker(t *testing.T, a, b *netlab.Pod, marker []byte, n int) {
	t.Helper()
	var conn *net.UDPConn
	require.NoError(t, nlsafe.InNamespace(a.NS, func() error {
		var err error
		conn, err = net.DialUDP("udp4", net.UDPAddrFromAddrPort(netip.AddrPortFrom(a.IP, 0)), net.UDPAddrFromAddrPort(netip.AddrPortFrom(b.IP, 9)))
		return err
	}))
	defer conn.Close()
	for range n {
		_, err := conn.Write(marker)
		require.NoError(t, err)
	}
}

// TestInVMAgentsRekey: under real Agents, Network.Run rekeys on its
// interval and publishes through Env.Publish; the new public keys reach the
// store and the peers, every SPI changes, and traffic flowing all along
// loses nothing.
func TestInVMAgentsRekey(t *testing.T) {
	inVM(t)
	l := startAgents(t, 2, `{"Network":"10.244.0.0/16","Backend":{"Type":"ipsec","PSK":"`+clusterPSK+`","RekeyInterval":"8s"}}`)
	lab, pods, logs, store := l.lab, l.pods, l.logs, l.store
	require.NoError(t, pods[0].Ping(ctxT(t, 20*time.Second), pods[1].IP))

	data := func() map[string]string {
		out := map[string]string{}
		for _, l := range store.Leases() {
			out[l.Key()] = string(l.Attrs.BackendData)
		}
		return out
	}
	before := data()
	beforeSPIs := spis(t, lab.Nodes[0].Handle)
	probe := vmlab.StartUDPProbe(t, pods[0], pods[1], 20*time.Millisecond)

	// Both nodes rekey and publish; the store holds the new keys.
	require.Eventually(t, func() bool {
		now := data()
		for k, v := range before {
			if now[k] == v {
				return false
			}
		}
		return true
	}, 60*time.Second, 100*time.Millisecond, "every node published a new key")
	// Outbound switches after Grace/2 and old keys retire after Grace
	// (half the 8s interval): wait for that, traffic flowing.
	require.Eventually(t, func() bool {
		for _, n := range lab.Nodes {
			now := spis(t, n.Handle)
			if len(now) != perPeer {
				return false
			}
			for s := range now {
				if beforeSPIs[s] {
					return false
				}
			}
		}
		return true
	}, 60*time.Second, 100*time.Millisecond, "the old keys retired")
	probe.Stop()

	t.Logf("udp probe: sent %d, answered %d", probe.Sent.Load(), probe.Got.Load())
	assert.Positive(t, probe.Sent.Load())
	if !assert.Equal(t, probe.Sent.Load(), probe.Got.Load(), "datagrams lost during the rekey: %v", probe.Missing()) {
		var keyLogs []string
		for l := range strings.Lines(logs.String()) {
			if strings.Contains(l, "rekey") || strings.Contains(l, "key changed") || strings.Contains(l, "publish") {
				keyLogs = append(keyLogs, l)
			}
		}
		t.Logf("probe started at %s; key events:\n%s", probe.Start.Format(time.RFC3339Nano), strings.Join(keyLogs, ""))
	}
	for s := range spis(t, lab.Nodes[0].Handle) {
		assert.False(t, beforeSPIs[s], "SPI %#x survived the rekey", s)
	}
	require.NoError(t, pods[1].TCPCheck(ctxT(t, 20*time.Second), pods[0], pods[0].IP))
	assert.NotContains(t, logs.String(), clusterPSK)
}
