package vxlan

import (
	"fmt"
	"net/netip"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/lease"
)

// TestDesireKeepsMemos: a full apply keeps the memo of a peer whose lease,
// links and DirectRouting answer are unchanged and that had no error, and
// computes every other one again.
func TestDesireKeepsMemos(t *testing.T) {
	peer := func(k int, mac string) lease.Lease {
		return lease.Lease{
			Subnet: netip.MustParsePrefix(fmt.Sprintf("10.1.%d.0/24", k)),
			Attrs: lease.Attrs{BackendType: Type, PublicIP: netip.MustParseAddr(fmt.Sprintf("100.64.0.%d", k)),
				BackendData: []byte(`{"VNI":1,"VtepMAC":"` + mac + `"}`)},
		}
	}
	peers := []lease.Lease{peer(1, "0a:00:00:00:00:01"), peer(2, "0a:00:00:00:00:02"), peer(3, "bad mac")}
	n := newNetwork(flannel.Env{}, lease.Lease{Subnet: netip.MustParsePrefix("10.1.0.0/24")}, Options{}.withDefaults(),
		[]*device{{spec: devSpec{name: "flannel.1"}, index: 5}})
	never := func(netip.Addr) bool { return false }
	var failed backend.PeerErrs
	first := n.desire(peers, never, &failed, memoBook{})
	require.Len(t, first.order, 3)
	require.NotEmpty(t, first.order[2].errs, "the bad MAC is an error")

	// Peer 1 is gone (peer 2 moves to index 0) and peer 3 is unchanged
	// but had an error.
	var failed2 backend.PeerErrs
	second := n.desire(peers[1:], never, &failed2, first)
	assert.Same(t, first.order[1], second.order[0], "unchanged peer keeps its memo")
	assert.NotSame(t, first.order[2], second.order[1], "a peer with an error is computed again")
	for _, o := range second.table(kindFDB, 5) {
		assert.Equal(t, 0, o.peer, "ops carry the peer's new index")
	}
	routes := second.table(kindRoute, 5)
	require.Len(t, routes, 1)
	assert.Equal(t, 0, routes[0].peer)
	assert.Same(t, second.order[0], routes[0].memo, "a route set points at its peer's memo")

	// Changed data, a recreated device (new index) or another DirectRouting
	// answer: computed again.
	changed := []lease.Lease{peer(2, "0a:00:00:00:00:22")}
	third := n.desire(changed, never, &failed2, second)
	assert.NotSame(t, second.order[0], third.order[0])

	kept := n.desire(peers[1:2], never, &failed2, second)
	require.Same(t, second.order[0], kept.order[0])
	n.devs[0].index = 9
	fresh := n.desire(peers[1:2], never, &failed2, kept)
	assert.NotSame(t, kept.order[0], fresh.order[0], "a recreated device's memos are computed again")
	assert.Equal(t, int32(9), fresh.order[0].fam[0].link)

	n.opts.DirectRouting = true
	direct := n.desire(peers[1:2], func(netip.Addr) bool { return true }, &failed2, fresh)
	assert.NotSame(t, fresh.order[0], direct.order[0])
	assert.Empty(t, direct.order[0].ops(kindFDB, 0), "a direct peer has no FDB entry")
	assert.Equal(t, famDirect, direct.order[0].fam[0].mode)
	again := n.desire(peers[1:2], func(netip.Addr) bool { return true }, &failed2, direct)
	assert.Same(t, direct.order[0], again.order[0])
	notDirect := n.desire(peers[1:2], never, &failed2, again)
	assert.NotSame(t, again.order[0], notDirect.order[0], "the underlay route changed")
}

// TestMemoIndexClash: a key whose hash slot another key holds lives in
// clash, and updates and removals find it there.
func TestMemoIndexClash(t *testing.T) {
	key := func(k int) leaseKey {
		return keyOf(lease.Lease{Subnet: netip.MustParsePrefix(fmt.Sprintf("10.1.%d.0/24", k))})
	}
	memo := func(k int) *peerMemo { return &peerMemo{key: key(k)} }
	x := newMemoIndex(4)
	m1, m2 := memo(1), memo(2)
	x.put(m1)
	x.put(m2)
	for _, m := range []*peerMemo{m1, m2} {
		got, ok := x.get(m.key)
		require.True(t, ok)
		assert.Same(t, m, got)
	}
	_, ok := x.get(key(3))
	assert.False(t, ok)

	// Key 3's slot is taken by memo 1, as by a hash collision.
	h3 := x.hash(key(3))
	x.byHash[h3] = m1
	m3 := memo(3)
	x.put(m3)
	assert.Same(t, m1, x.byHash[h3], "the slot's holder stays")
	got, ok := x.get(key(3))
	require.True(t, ok)
	assert.Same(t, m3, got)
	m3b := memo(3)
	x.put(m3b)
	got, _ = x.get(key(3))
	assert.Same(t, m3b, got, "an update in clash replaces the memo")
	x.remove(key(3))
	_, ok = x.get(key(3))
	assert.False(t, ok)
	assert.Same(t, m1, x.byHash[h3], "removing a key in clash leaves the slot's holder")

	// The holder goes: key 3 moves to its slot and leaves clash.
	x.put(m3)
	delete(x.byHash, h3)
	x.put(m3b)
	assert.Empty(t, x.clash)
	x.remove(key(3))
	_, ok = x.get(key(3))
	assert.False(t, ok, "no stale memo is left in clash")
}

// TestMemoBookChunks: chunks hands on a table's entries in order, in
// slices of at most the size asked for, and stops at the first error.
func TestMemoBookChunks(t *testing.T) {
	book := newMemoBook(5, memoStamp{})
	for k := range 5 {
		m := &peerMemo{key: keyOf(lease.Lease{Subnet: netip.MustParsePrefix(fmt.Sprintf("10.1.%d.0/24", k))})}
		m.fam[0] = famMemo{mode: famOverlay, mac: [6]byte{0x0a, 0, 0, 0, 0, byte(k)}, link: 5}
		book.set(m)
	}
	want := book.table(kindNeigh, 5)
	require.Len(t, want, 5)
	var got []op
	var sizes []int
	require.NoError(t, book.chunks(kindNeigh, 5, 2, func(c []op) error {
		sizes = append(sizes, len(c))
		got = append(got, c...)
		return nil
	}))
	assert.Equal(t, []int{2, 2, 1}, sizes)
	assert.Equal(t, want, got)
	for i, o := range got {
		assert.Equal(t, i, o.peer)
	}
	calls := 0
	err := book.chunks(kindNeigh, 5, 2, func([]op) error { calls++; return assert.AnError })
	assert.ErrorIs(t, err, assert.AnError)
	assert.Equal(t, 1, calls)
	assert.NoError(t, book.chunks(kindFDB, 7, 2, func([]op) error { t.Fatal("no entries on link 7"); return nil }))
}

// TestLeaseKey: a lease's key gives back its subnets, tells the families
// apart, and is equal only for the same subnets.
func TestLeaseKey(t *testing.T) {
	p := netip.MustParsePrefix
	for _, l := range []lease.Lease{
		{Subnet: p("10.244.3.0/24")},
		{IPv6Subnet: p("fd00:10:244:3::/64")},
		{Subnet: p("10.244.3.0/24"), IPv6Subnet: p("fd00:10:244:3::/64")},
		{Subnet: p("0.0.0.0/0")},
		{},
	} {
		k := keyOf(l)
		assert.Equal(t, l.Subnet, k.prefix(false), "%v", l)
		assert.Equal(t, l.IPv6Subnet, k.prefix(true), "%v", l)
	}
	assert.NotEqual(t, keyOf(lease.Lease{Subnet: p("10.244.3.0/24")}), keyOf(lease.Lease{Subnet: p("10.244.3.0/25")}))
	assert.NotEqual(t, keyOf(lease.Lease{Subnet: p("0.0.0.0/0")}), keyOf(lease.Lease{}), "a /0 is a subnet")
	assert.NotEqual(t, keyOf(lease.Lease{Subnet: p("10.244.3.0/24")}),
		keyOf(lease.Lease{Subnet: p("10.244.3.0/24"), IPv6Subnet: p("fd00::/64")}))
	assert.Equal(t, keyOf(lease.Lease{Subnet: p("10.244.3.0/24")}), keyOf(lease.Lease{Subnet: p("10.244.3.0/24")}))
}
