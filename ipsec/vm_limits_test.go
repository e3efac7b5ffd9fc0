package ipsec_test

import (
	"bytes"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/internal/vmlab"
	"github.com/flannelkit/flannel/ipsec"
	"github.com/flannelkit/flannel/lease"
)

// TestInVMRekeyOnSoftLimit: node 1's outbound states have a soft limit of
// 200 packets (hard: 400) and an hour's RekeyInterval. A UDP probe from
// pod 0 to pod 1 makes node 1's echoes reach the soft limit: the kernel
// reports it, node 1 rekeys early and publishes, node 0 takes the new key,
// and no datagram is lost, although the old key's hard limit is a few
// seconds of probe traffic away.
func TestInVMRekeyOnSoftLimit(t *testing.T) {
	inVM(t)
	opts := ipsec.Options{Grace: 2 * time.Second, RekeyInterval: time.Hour, RepairInterval: time.Hour}
	c := newCluster(t, 2, func(int) string { return clusterPSK }, opts)
	published := make(chan lease.Attrs, 8)
	v1 := c.nodes[1]
	v1.opts = ipsec.WithLimits(v1.opts, 200)
	v1.opts.Publish = func(a lease.Attrs) {
		select {
		case published <- a:
		default:
		}
	}
	c.start(1) // with the limits and Publish
	c.applyOK()
	c.checkAllPairs()
	first := v1.net.(*ipsec.Network).PublicKey()
	stop := c.runAll()
	probe := vmlab.StartUDPProbe(t, c.nodes[0].pod, c.nodes[1].pod, 20*time.Millisecond)

	// The store's job: node 0 sees all node 1 publishes (Start published
	// its key bound to the lease already; then every rekey: with limits
	// this low, one every few seconds).
	var mu sync.Mutex
	done := make(chan struct{})
	var store sync.WaitGroup
	store.Go(func() {
		for {
			select {
			case a := <-published:
				mu.Lock()
				v1.lease.Attrs = a
				for i, err := range c.apply() {
					assert.NoError(t, err, "node %d apply", i)
				}
				mu.Unlock()
			case <-done:
				return
			}
		}
	})
	require.Eventually(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return !bytes.Equal(first, v1.net.(*ipsec.Network).PublicKey()) &&
			bytes.Equal(v1.lease.Attrs.BackendData, v1.net.Lease().Attrs.BackendData)
	}, 2*time.Minute, 50*time.Millisecond, "an early rekey, published")
	// Traffic keeps flowing on the new key, past the old key's hard limit.
	probe.WaitAnswers(t, 400)
	probe.Stop()
	close(done)
	store.Wait()
	stop()
	t.Logf("udp probe: sent %d, answered %d", probe.Sent.Load(), probe.Got.Load())
	assert.Equal(t, probe.Sent.Load(), probe.Got.Load(), "datagrams lost: %v", probe.Missing())
	assert.Contains(t, v1.logs.String(), "reached its soft limit")
	c.checkLogsFree()
}
