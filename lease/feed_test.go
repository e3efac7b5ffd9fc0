package lease

import (
	"cmp"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// feedStore is a store's side of a Feed as the etcd store keeps it: the
// candidates sorted by name, a changed key replaced by a new Candidate.
type feedStore struct {
	cfg   Config
	own   Lease
	cands []Candidate
	feed  Feed
	order int64
}

func newFeedStore() *feedStore {
	return &feedStore{cfg: Config{EnableIPv4: true, Network: netip.MustParsePrefix("10.0.0.0/8")}.WithDefaults()}
}

func feedLease(i int, ip string) Lease {
	return Lease{
		Subnet: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, byte(i >> 8), byte(i), 0}), 24),
		Attrs:  Attrs{PublicIP: netip.MustParseAddr(ip), BackendType: "vxlan"},
	}
}

func (s *feedStore) put(l Lease) {
	if i := slices.IndexFunc(s.cands, func(c Candidate) bool { return c.Name == l.Key() }); i >= 0 &&
		s.cands[i].Lease.SameSubnets(l) && s.cands[i].Lease.Attrs.Equal(l.Attrs) {
		return // a renewal: the store keeps the candidate
	}
	s.del(l.Key())
	s.order++
	c := Candidate{Name: l.Key(), Lease: l, Order: s.order, Own: s.own.SameSubnets(l)}
	i, _ := slices.BinarySearchFunc(s.cands, c.Name, func(a Candidate, n string) int { return cmp.Compare(a.Name, n) })
	s.cands = slices.Insert(s.cands, i, c)
}

func (s *feedStore) del(name string) {
	s.cands = slices.DeleteFunc(s.cands, func(c Candidate) bool { return c.Name == name })
}

func (s *feedStore) next() ([]Lease, bool) {
	leases, _, changed := s.feed.Next(s.cfg, s.cands, s.own)
	return leases, changed
}

func keys(ls []Lease) []string {
	out := make([]string, len(ls))
	for i, l := range ls {
		out[i] = l.Key()
	}
	return out
}

func TestFeed(t *testing.T) {
	t.Parallel()
	s := newFeedStore()
	s.own = feedLease(5, "192.0.2.5")
	for _, i := range []int{1, 5, 9} {
		s.put(feedLease(i, fmt.Sprintf("192.0.2.%d", i)))
	}
	first, changed := s.next()
	assert.True(t, changed, "the first call")
	assert.Equal(t, []string{"10.0.5.0-24", "10.0.1.0-24", "10.0.9.0-24"}, keys(first), "own's first, then in the candidates' order")
	assert.Equal(t, len(first), cap(first), "a view's capacity is its length: a consumer's append copies")

	again, changed := s.next()
	assert.False(t, changed, "nothing changed")
	assert.Equal(t, keys(first), keys(again))

	s.put(feedLease(3, "192.0.2.3"))
	joined, changed := s.next()
	assert.True(t, changed)
	assert.Equal(t, []string{"10.0.5.0-24", "10.0.1.0-24", "10.0.9.0-24", "10.0.3.0-24"}, keys(joined), "a join is appended")
	s.put(feedLease(7, "192.0.2.7"))
	s.put(feedLease(8, "192.0.2.8"))
	two, changed := s.next()
	assert.True(t, changed)
	assert.Equal(t, []string{"10.0.5.0-24", "10.0.1.0-24", "10.0.9.0-24", "10.0.3.0-24", "10.0.7.0-24", "10.0.8.0-24"}, keys(two))
	assert.Same(t, &joined[0], &two[0], "the second join was written into the array of the first")
	assert.Equal(t, []string{"10.0.5.0-24", "10.0.1.0-24", "10.0.9.0-24"}, keys(first), "earlier views do not change")
	assert.Equal(t, []string{"10.0.5.0-24", "10.0.1.0-24", "10.0.9.0-24", "10.0.3.0-24"}, keys(joined))

	// A renewal the store keeps as the same candidate changes nothing.
	s.put(feedLease(3, "192.0.2.3"))
	_, changed = s.next()
	assert.False(t, changed)

	// A new value under a key: a new array, in the candidates' order.
	s.put(feedLease(9, "192.0.2.99"))
	moved, changed := s.next()
	assert.True(t, changed)
	assert.Equal(t, []string{"10.0.5.0-24", "10.0.1.0-24", "10.0.3.0-24", "10.0.7.0-24", "10.0.8.0-24", "10.0.9.0-24"}, keys(moved))
	assert.Equal(t, netip.MustParseAddr("192.0.2.99"), moved[5].Attrs.PublicIP)
	assert.Equal(t, netip.MustParseAddr("192.0.2.9"), two[2].Attrs.PublicIP, "the old view still shows the old value")

	// A key removed.
	s.del("10.0.1.0-24")
	gone, changed := s.next()
	assert.True(t, changed)
	assert.Equal(t, []string{"10.0.5.0-24", "10.0.3.0-24", "10.0.7.0-24", "10.0.8.0-24", "10.0.9.0-24"}, keys(gone))

	// A lease no longer valid: an older holder of its subnet appears.
	// (Orders are the store's: give the newcomer the lowest.)
	thief := feedLease(7, "192.0.2.70")
	thief.Attrs.BackendType = "host-gw"
	s.cands = append(s.cands, Candidate{Name: "zz-older", Lease: thief, Order: -1})
	lost, changed := s.next()
	assert.True(t, changed)
	assert.Equal(t, []string{"10.0.5.0-24", "10.0.3.0-24", "10.0.8.0-24", "10.0.9.0-24", "10.0.7.0-24"}, keys(lost))
	assert.Equal(t, "host-gw", lost[4].Attrs.BackendType, "the older holder of 10.0.7.0/24")
	_, ignored, _ := s.feed.Next(s.cfg, s.cands, s.own)
	require.Len(t, ignored, 1)
	assert.Equal(t, RuleOverlap, ignored[0].Rule)
	assert.Equal(t, "10.0.7.0-24", ignored[0].Name)
}

func TestFeedOwn(t *testing.T) {
	t.Parallel()
	s := newFeedStore()
	s.put(feedLease(1, "192.0.2.1"))
	s.put(feedLease(2, "192.0.2.2"))
	before, _ := s.next()
	assert.Equal(t, []string{"10.0.1.0-24", "10.0.2.0-24"}, keys(before))

	// The node acquires its lease after the first snapshot: a join, but
	// own's lease goes first.
	s.own = feedLease(3, "192.0.2.3")
	s.put(s.own)
	after, changed := s.next()
	assert.True(t, changed)
	assert.Equal(t, []string{"10.0.3.0-24", "10.0.1.0-24", "10.0.2.0-24"}, keys(after))

	// Own's lease known but not yet in the store; then it appears.
	s2 := newFeedStore()
	s2.own = feedLease(3, "192.0.2.3")
	s2.put(feedLease(1, "192.0.2.1"))
	s2.next()
	s2.put(s2.own)
	got, _ := s2.next()
	assert.Equal(t, []string{"10.0.3.0-24", "10.0.1.0-24"}, keys(got))
}

// TestFeedAgrees drives a Feed and PeerLeases with the same random changes
// (joins, leaves, new values, hostile and overlapping keys): after each,
// both give the same valid leases, own's first, and Feed reports every
// change of the valid leases.
func TestFeedAgrees(t *testing.T) {
	t.Parallel()
	rng := rand.New(rand.NewPCG(7, 16))
	s := newFeedStore()
	s.own = feedLease(0, "192.0.2.200")
	s.put(s.own)
	var prev []Lease
	spurious := 0 // changed reported for the same leases
	var views [][]Lease
	var copies [][]Lease
	for step := range 1000 {
		r := rng.IntN(10)
		switch {
		case r < 6: // a join, or a new value under a key
			s.put(feedLease(1+rng.IntN(300), fmt.Sprintf("192.0.2.%d", rng.IntN(3))))
		case r < 8 && len(s.cands) > 1:
			i := rng.IntN(len(s.cands))
			if !s.cands[i].Own {
				s.cands = slices.Delete(s.cands, i, i+1)
			}
		case r < 9: // a hostile key
			s.cands = append(s.cands, Candidate{Name: fmt.Sprintf("~hostile%d", step), Lease: Lease{Subnet: netip.MustParsePrefix("0.0.0.0/1")}})
		default: // a second holder of a subnet, older or as old
			l := feedLease(1+rng.IntN(300), "192.0.2.9")
			s.cands = append(s.cands, Candidate{Name: fmt.Sprintf("~dup%d", step), Lease: l, Order: int64(rng.IntN(3)) - 1})
		}
		got, changed := s.next()
		want, _ := s.cfg.PeerLeases(s.cands, s.own)
		require.Equal(t, want[0].Key(), got[0].Key(), "step %d: own's first", step)
		slices.SortFunc(want, func(a, b Lease) int { return cmp.Compare(a.Key(), b.Key()) })
		sorted := slices.SortedFunc(slices.Values(got), func(a, b Lease) int { return cmp.Compare(a.Key(), b.Key()) })
		require.Equal(t, want, sorted, "step %d: Feed and PeerLeases agree", step)
		differs := !slices.EqualFunc(prev, sorted, func(a, b Lease) bool { return a.SameSubnets(b) && a.Attrs.Equal(b.Attrs) })
		if differs {
			require.True(t, changed, "step %d (op %d): a change unreported", step, r)
		} else if changed {
			spurious++
		}
		prev = sorted
		if step%50 == 0 {
			views, copies = append(views, got), append(copies, slices.Clone(got))
		}
	}
	for i := range views {
		require.Equal(t, copies[i], views[i], "view %d was written after it was handed out", i)
	}
	// Only a subnet whose holder was replaced by an equal lease of another
	// key (a duplicate winning) is reported as a change of the same leases.
	assert.Less(t, spurious, 10, "changes reported for the same leases")
	t.Logf("%d of 1000 changes reported for the same leases", spurious)
}

// TestFeedJoinAllocates: a join to 5,000 leases allocates nothing but, now
// and then, a larger array (PeerLeases allocates a new verdict and a new
// array of every lease on every change).
func TestFeedJoinAllocates(t *testing.T) {
	s := newFeedStore()
	for i := range 5000 {
		l := feedLease(i*2, "192.0.2.1")
		s.cands = append(s.cands, Candidate{Name: l.Key(), Lease: l, Order: int64(i)})
	}
	joins := make([]Candidate, 101) // AllocsPerRun's warm-up and 100 runs
	for i := range joins {
		l := feedLease(i*2+1, "192.0.2.2")
		joins[i] = Candidate{Name: l.Key(), Lease: l, Order: int64(10000 + i)}
	}
	s.cands = slices.Grow(s.cands, len(joins))
	s.next()
	i := 0
	allocs := testing.AllocsPerRun(100, func() {
		s.cands = append(s.cands, joins[i])
		i++
		if _, changed := s.next(); !changed {
			t.Fatal("a join went unseen")
		}
	})
	assert.LessOrEqual(t, allocs, 1.0, "allocations per join")
}
