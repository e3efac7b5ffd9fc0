package etcdstore

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

// TestWatchStateKeysStaySorted: the watch keeps its keys sorted across
// puts (new and repeated) and deletes (known and unknown), so judge gets
// them in order without sorting every key on every event.
func TestWatchStateKeysStaySorted(t *testing.T) {
	w := &watchState{current: map[string]entry{}}
	for _, k := range []string{"/s/10.0.5.0-24", "/s/10.0.1.0-24", "/s/10.0.9.0-24", "/s/10.0.1.0-24", "/s/10.0.3.0-24"} {
		w.put(k, entry{key: k})
	}
	assert.Equal(t, []string{"/s/10.0.1.0-24", "/s/10.0.3.0-24", "/s/10.0.5.0-24", "/s/10.0.9.0-24"}, w.keys)
	w.del("/s/10.0.5.0-24")
	w.del("/s/10.0.7.0-24")
	assert.Equal(t, []string{"/s/10.0.1.0-24", "/s/10.0.3.0-24", "/s/10.0.9.0-24"}, w.keys)
	assert.Len(t, w.current, 3)
}
