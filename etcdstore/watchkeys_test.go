package etcdstore

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
)

// TestWatchStateKeysStaySorted: the watch keeps its keys sorted across
// puts (new and repeated, the later value winning, a key moving between
// parsed and malformed) and deletes (known and unknown), so judge gets
// them in order without a map, a copy or a sort of every key per event.
func TestWatchStateKeysStaySorted(t *testing.T) {
	w := &watchState{s: &Store{subnetsKey: "/s/"}}
	for i, k := range []string{"/s/10.0.5.0-24", "/s/10.0.1.0-24", "/s/10.0.9.0-24", "/s/10.0.1.0-24", "/s/10.0.3.0-24"} {
		w.put(entry{key: k, ok: true, createRev: int64(i + 1)})
	}
	assert.Equal(t, []string{"10.0.1.0-24", "10.0.3.0-24", "10.0.5.0-24", "10.0.9.0-24"}, w.keys(), "named under the prefix")
	assert.Equal(t, int64(4), w.cands[0].Order, "a repeated put replaces the value")
	w.del("/s/10.0.5.0-24")
	w.del("/s/10.0.7.0-24")
	assert.Equal(t, []string{"10.0.1.0-24", "10.0.3.0-24", "10.0.9.0-24"}, w.keys())

	bad := errors.New("value: unexpected end of JSON input")
	w.put(entry{key: "/s/10.0.3.0-24", err: bad})
	w.put(entry{key: "/s/10.0.0.0-24", err: bad})
	assert.Equal(t, []string{"10.0.1.0-24", "10.0.9.0-24"}, w.keys(), "a key whose value turned bad leaves the candidates")
	if assert.Len(t, w.malformed, 2) {
		assert.Equal(t, "10.0.0.0-24", w.malformed[0].Name)
		assert.Equal(t, bad.Error(), w.malformed[1].Detail)
	}
	w.put(entry{key: "/s/10.0.3.0-24", ok: true})
	w.del("/s/10.0.0.0-24")
	assert.Equal(t, []string{"10.0.1.0-24", "10.0.3.0-24", "10.0.9.0-24"}, w.keys(), "and comes back when it parses")
	assert.Empty(t, w.malformed)
}

func (w *watchState) keys() []string {
	out := make([]string, len(w.cands))
	for i, c := range w.cands {
		out[i] = c.Name
	}
	return out
}
