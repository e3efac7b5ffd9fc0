package etcdstore_test

import (
	"fmt"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/etcdstore"
	"github.com/flannelkit/flannel/internal/etcdtest"
	"github.com/flannelkit/flannel/internal/storetest"
	"github.com/flannelkit/flannel/lease"
)

// TestListInPages: a listing read in pages (here of two keys) is the
// whole, consistent set: a key written between two pages is not in it,
// and a revision compacted between two pages starts the listing over.
func TestListInPages(t *testing.T) {
	t.Parallel()
	e := newEnv(t, etcdtest.Options{})
	e.putConfig(t, netConf)
	ctx := t.Context()
	var keys []string
	for i := range 7 {
		l, err := e.store(t, nil, etcdstore.Options{}).Acquire(ctx, lease.Request{Attrs: attrs(10 + i)})
		require.NoError(t, err)
		keys = append(keys, l.Key())
	}
	watchKeys := func(s *etcdstore.Store) []string {
		w := storetest.Watch(t, s)
		defer w.Stop(t)
		got := storetest.Keys(w.WaitFor(t, "the first snapshot", func(lease.Snapshot) bool { return true }))
		slices.Sort(got)
		return got
	}
	slices.Sort(keys)

	// A key written after the first page is not in the listing (it
	// follows as a watch event).
	s := e.store(t, nil, etcdstore.Options{})
	var pages atomic.Int32
	late := e.prefix + "/subnets/10.244.200.0-24"
	etcdstore.SetListPage(s, 2, func() {
		if pages.Add(1) == 1 {
			_, err := e.admin.Put(ctx, late, string(fmt.Appendf(nil, `{"PublicIP":"%s","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:c8"}}`, nodeIP(200))))
			assert.NoError(t, err)
		}
	})
	assert.Equal(t, keys, watchKeys(s))
	assert.Equal(t, int32(3), pages.Load(), "seven keys in pages of two: three requests after the first")

	// Compacted past the listing's revision between two pages: listed
	// again, the late key now in it.
	s = e.store(t, nil, etcdstore.Options{})
	pages.Store(0)
	etcdstore.SetListPage(s, 2, func() {
		if pages.Add(1) == 1 {
			r, err := e.admin.Put(ctx, e.prefix+"/unrelated", "x")
			if assert.NoError(t, err) {
				assert.NoError(t, e.srv.Compact(ctx, r.Header.Revision))
			}
		}
	})
	want := append(slices.Clone(keys), "10.244.200.0-24")
	slices.Sort(want)
	assert.Equal(t, want, watchKeys(s))
	assert.Equal(t, int32(4), pages.Load(), "one page, then eight keys from the start: four requests after the first")
}

// TestFindOwnListingReused: a starting node lists once. Acquire starts
// from the listing FindOwn made and Watch from Acquire's, and a listing
// gone stale between FindOwn and Acquire only costs a retry: no subnet
// is handed out twice, and a reclaimed key changed meanwhile is still
// reclaimed.
func TestFindOwnListingReused(t *testing.T) {
	t.Parallel()
	e := newEnv(t, etcdtest.Options{})
	// Four subnets: 10.5.0.0/26 .. 10.5.0.192/26.
	e.putConfig(t, `{"Network":"10.5.0.0/24","SubnetLen":26,"SubnetMin":"10.5.0.0"}`)
	ctx := t.Context()
	for i := range 2 {
		_, err := e.store(t, nil, etcdstore.Options{}).Acquire(ctx, lease.Request{Attrs: attrs(i)})
		require.NoError(t, err)
	}

	// One listing for FindOwn, Acquire and the first snapshot: in pages
	// of one key, two keys cost one call between pages.
	s := e.store(t, nil, etcdstore.Options{})
	var pages atomic.Int32
	etcdstore.SetListPage(s, 1, func() { pages.Add(1) })
	_, found, err := s.FindOwn(ctx, attrs(2))
	require.NoError(t, err)
	require.False(t, found)
	require.Equal(t, int32(1), pages.Load(), "FindOwn lists two keys in two pages")
	mine, err := s.Acquire(ctx, lease.Request{Attrs: attrs(2)})
	require.NoError(t, err)
	assert.Equal(t, int32(1), pages.Load(), "Acquire starts from FindOwn's listing")
	w := storetest.Watch(t, s)
	snap := w.WaitFor(t, "the first snapshot", func(lease.Snapshot) bool { return true })
	w.Stop(t)
	assert.Len(t, snap.Leases, 3)
	assert.Contains(t, storetest.Keys(snap), mine.Key())
	assert.Equal(t, int32(1), pages.Load(), "Watch starts from Acquire's listing")

	// Stale: after FindOwn, another node takes the last free subnet, the
	// only one free in FindOwn's view. Acquire loses the compare-and-swap
	// and lists again: the network is full, and the subnet stays the
	// other node's.
	late := e.store(t, nil, etcdstore.Options{})
	_, _, err = late.FindOwn(ctx, attrs(3))
	require.NoError(t, err)
	other, err := e.store(t, nil, etcdstore.Options{}).Acquire(ctx, lease.Request{Attrs: attrs(4)})
	require.NoError(t, err)
	_, err = late.Acquire(ctx, lease.Request{Attrs: attrs(3)})
	require.ErrorIs(t, err, lease.ErrNoFreeSubnet)
	kv, ok := e.get(t, e.prefix+"/subnets/"+other.Key())
	require.True(t, ok)
	assert.Contains(t, kv.Value, nodeIP(4).String())
	assert.Len(t, e.subnetKeys(t), 4)

	// Stale own key: changed after FindOwn listed it, it is reclaimed on
	// the retry all the same.
	again := e.store(t, nil, etcdstore.Options{})
	prev, found, err := again.FindOwn(ctx, attrs(2))
	require.NoError(t, err)
	require.True(t, found)
	_, err = e.admin.Put(ctx, e.prefix+"/subnets/"+mine.Key(), string(fmt.Appendf(nil, `{"PublicIP":"%s","BackendType":"vxlan"}`, nodeIP(2))))
	require.NoError(t, err)
	got, err := again.Acquire(ctx, lease.Request{Attrs: attrs(2), Previous: prev})
	require.NoError(t, err)
	assert.Equal(t, mine.Subnet, got.Subnet)
	assert.Len(t, e.subnetKeys(t), 4)

	// A listing older than foundMaxAge is not used: Acquire lists again.
	var clock atomic.Int64
	clock.Store(time.Now().UnixNano())
	old := e.store(t, nil, etcdstore.Options{Now: func() time.Time { return time.Unix(0, clock.Load()) }})
	pages.Store(0)
	etcdstore.SetListPage(old, 1, func() { pages.Add(1) })
	_, _, err = old.FindOwn(ctx, attrs(2))
	require.NoError(t, err)
	require.Equal(t, int32(3), pages.Load(), "four keys: three calls between pages")
	clock.Add(int64(11 * time.Second))
	_, err = old.Acquire(ctx, lease.Request{Attrs: attrs(2)})
	require.NoError(t, err)
	assert.Equal(t, int32(6), pages.Load(), "a listing 11 s old is listed again")
}
