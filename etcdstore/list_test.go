package etcdstore_test

import (
	"fmt"
	"slices"
	"sync/atomic"
	"testing"

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
