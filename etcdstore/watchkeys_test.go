package etcdstore

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

// TestWatchStateKeysStaySorted: the watch keeps its entries sorted by key
// across puts (new and repeated, the later value winning) and deletes
// (known and unknown), so judge gets them in order without a map, a copy
// or a sort of every key on every event.
func TestWatchStateKeysStaySorted(t *testing.T) {
	w := &watchState{}
	for i, k := range []string{"/s/10.0.5.0-24", "/s/10.0.1.0-24", "/s/10.0.9.0-24", "/s/10.0.1.0-24", "/s/10.0.3.0-24"} {
		w.put(entry{key: k, modRev: int64(i + 1)})
	}
	assert.Equal(t, []string{"/s/10.0.1.0-24", "/s/10.0.3.0-24", "/s/10.0.5.0-24", "/s/10.0.9.0-24"}, keysOf(w.entries))
	assert.Equal(t, int64(4), w.entries[0].modRev, "a repeated put replaces the value")
	w.del("/s/10.0.5.0-24")
	w.del("/s/10.0.7.0-24")
	assert.Equal(t, []string{"/s/10.0.1.0-24", "/s/10.0.3.0-24", "/s/10.0.9.0-24"}, keysOf(w.entries))
}

// TestCompactKeys: a listing that names a key twice keeps its last value.
func TestCompactKeys(t *testing.T) {
	got := compactKeys([]entry{{key: "a", modRev: 1}, {key: "a", modRev: 2}, {key: "b", modRev: 3}, {key: "c", modRev: 4}, {key: "c", modRev: 5}})
	assert.Equal(t, []entry{{key: "a", modRev: 2}, {key: "b", modRev: 3}, {key: "c", modRev: 5}}, got)
}

func keysOf(es []entry) []string {
	out := make([]string, len(es))
	for i, e := range es {
		out[i] = e.key
	}
	return out
}
