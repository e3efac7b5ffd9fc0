package storetest

import (
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/lease"
)

// testWatch: the full set first (Resync), then a snapshot after every
// change; nil on cancel and one goroutine at a time (checked by Watcher).
func testWatch(t *testing.T, f Factory) {
	c := f.New(t, NetConf)
	var own [3]lease.Lease
	s0 := c.Store(t, 0, nil)
	for i := range 2 {
		var err error
		own[i], err = c.Store(t, i, nil).Acquire(t.Context(), lease.Request{Attrs: Attrs(i)})
		require.NoError(t, err)
	}
	w := Watch(t, s0)
	w.WaitFor(t, "the first snapshot", func(lease.Snapshot) bool { return true })
	first := w.All()[0]
	assert.True(t, first.Resync, "the first snapshot is a resync")
	assert.ElementsMatch(t, []string{own[0].Key(), own[1].Key()}, Keys(first), "the first snapshot is complete")

	var err error
	own[2], err = c.Store(t, 2, nil).Acquire(t.Context(), lease.Request{Attrs: Attrs(2)})
	require.NoError(t, err)
	sn := w.WaitFor(t, "node 2 added", HasKey(own[2].Key()))
	assert.Len(t, sn.Leases, 3)
	c.Delete(t, 1)
	sn = w.WaitFor(t, "node 1 gone", Not(HasKey(own[1].Key())))
	assert.ElementsMatch(t, []string{own[0].Key(), own[2].Key()}, Keys(sn))
	w.Stop(t)
}

// testGap: after a gap (the server restarted) the watch carries on, and
// what changed after it is seen; every resync snapshot is complete.
func testGap(t *testing.T, f Factory) {
	c := f.New(t, NetConf)
	gap := c.Caps().Gap
	if gap == nil {
		t.Log("the store has no gaps")
		return
	}
	var own [3]lease.Lease
	for i := range 2 {
		var err error
		own[i], err = c.Store(t, i, nil).Acquire(t.Context(), lease.Request{Attrs: Attrs(i)})
		require.NoError(t, err)
	}
	w := Watch(t, c.Store(t, 0, nil))
	w.WaitFor(t, "both nodes", Len(2))
	gap(t)
	c.Delete(t, 1)
	var err error
	own[2], err = c.Store(t, 2, nil).Acquire(t.Context(), lease.Request{Attrs: Attrs(2)})
	require.NoError(t, err)
	sn := w.WaitFor(t, "the changes after the gap", func(sn lease.Snapshot) bool {
		return HasKey(own[2].Key())(sn) && !HasKey(own[1].Key())(sn)
	})
	assert.ElementsMatch(t, []string{own[0].Key(), own[2].Key()}, Keys(sn))
	for _, sn := range w.All() {
		if sn.Resync {
			assert.True(t, HasKey(own[0].Key())(sn), "a resync snapshot is complete: %v", Keys(sn))
		}
	}
}

// testHostile: leases outside the network, of the wrong length, or
// claiming this node's subnet are never handed out, do not stop valid
// ones, and are warned about once, naming them, however often the set
// changes or is listed again.
func testHostile(t *testing.T, f Factory) {
	c := f.New(t, NetConf)
	cfg := Config(t, NetConf)
	var log logs
	s := c.Store(t, 0, log.Logger())
	own, err := s.Acquire(t.Context(), lease.Request{Attrs: Attrs(0)})
	require.NoError(t, err)

	thief := Attrs(6)
	hostile := map[string]lease.Lease{
		"hostile-outside": {Subnet: netip.MustParsePrefix("172.0.0.0/8"), Attrs: Attrs(3)},
		"hostile-wide":    {Subnet: netip.MustParsePrefix("0.0.0.0/1"), Attrs: Attrs(4)},
		"hostile-length":  {Subnet: cfg.Network, Attrs: Attrs(5)},
		"hostile-thief":   {Subnet: own.Subnet, Attrs: thief},
	}
	names := map[string]string{}
	for name, l := range hostile {
		names[name] = c.Write(t, name, l)
	}
	valid := lease.Lease{Subnet: Subnet(cfg, 20), Attrs: Attrs(7)}
	c.Write(t, "valid-peer", valid)

	w := Watch(t, s)
	sn := w.WaitFor(t, "the valid peer", HasKey(valid.Key()))
	checkClean := func(sn lease.Snapshot) {
		t.Helper()
		for _, l := range sn.Leases {
			assert.NotEqual(t, thief.PublicIP, l.Attrs.PublicIP, "a lease claiming this node's subnet was handed out: %s", describe(l))
			for name, h := range hostile {
				if name != "hostile-thief" {
					assert.False(t, l.SameSubnets(h), "hostile lease %s handed out", name)
				}
			}
		}
	}
	checkClean(sn)
	for name, id := range names {
		Eventually(t, "a warning about "+name, func() bool { return log.count("ignoring lease", id) >= 1 })
	}

	// More changes and a second watch (a re-list) warn no more.
	valid2 := lease.Lease{Subnet: Subnet(cfg, 21), Attrs: Attrs(8)}
	c.Write(t, "valid-peer-2", valid2)
	checkClean(w.WaitFor(t, "the second valid peer", HasKey(valid2.Key())))
	w2 := Watch(t, s)
	checkClean(w2.WaitFor(t, "the second watch", HasKey(valid2.Key())))
	if c.Caps().Allocates {
		_, err := c.Store(t, 1, nil).Acquire(t.Context(), lease.Request{Attrs: Attrs(1)})
		require.NoError(t, err)
		w.WaitFor(t, "node 1", Len(len(sn.Leases)+2))
	}
	for name, id := range names {
		assert.Equal(t, 1, log.count("ignoring lease", id), "warnings about %s (%s): once per change\n%s", name, id, log.String())
	}
}

// testMalformed: data that does not parse is skipped with a warning
// naming it, once.
func testMalformed(t *testing.T, f Factory) {
	c := f.New(t, NetConf)
	cfg := Config(t, NetConf)
	var log logs
	s := c.Store(t, 0, log.Logger())
	_, err := s.Acquire(t.Context(), lease.Request{Attrs: Attrs(0)})
	require.NoError(t, err)
	id := c.WriteMalformed(t, "malformed-node")
	if id == "" {
		t.Log("the store cannot hold malformed data")
		return
	}
	valid := lease.Lease{Subnet: Subnet(cfg, 20), Attrs: Attrs(7)}
	c.Write(t, "valid-peer", valid)
	w := Watch(t, s)
	sn := w.WaitFor(t, "the valid peer", HasKey(valid.Key()))
	assert.Len(t, sn.Leases, 2, "own and the valid peer; the malformed one skipped: %v", Keys(sn))
	Eventually(t, "a warning naming "+id, func() bool { return log.count(id) >= 1 })
	valid2 := lease.Lease{Subnet: Subnet(cfg, 21), Attrs: Attrs(8)}
	c.Write(t, "valid-peer-2", valid2)
	w.WaitFor(t, "the second valid peer", HasKey(valid2.Key()))
	assert.Equal(t, 1, log.count(id), "warned once\n%s", log.String())
}
