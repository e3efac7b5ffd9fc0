package lease

import (
	"encoding/json"
	"sync"
)

// Warnings remembers which ignored leases a store has reported, so that it
// warns about each one once per change to its value (its subnets,
// attributes, or the rule it breaks) rather than on every retry, re-list
// or watch event. The zero value is ready; it is safe for concurrent use.
type Warnings struct {
	mu   sync.Mutex
	seen map[string]string // Name -> fingerprint of the last report
}

// Fresh returns those of ignored that were not reported before with the
// same value, and remembers them. ignored must be every lease the store
// ignores right now: a name missing from it is forgotten, so a lease that
// becomes valid and later invalid again is reported again.
func (w *Warnings) Fresh(ignored []Ignored) []Ignored {
	w.mu.Lock()
	defer w.mu.Unlock()
	now := make(map[string]string, len(ignored))
	var out []Ignored
	for _, ig := range ignored {
		fp := fingerprint(ig)
		now[ig.Name] = fp
		if w.seen[ig.Name] != fp {
			out = append(out, ig)
		}
	}
	w.seen = now
	return out
}

func fingerprint(ig Ignored) string {
	attrs, _ := json.Marshal(ig.Lease.Attrs)
	return string(ig.Rule) + "\x00" + ig.Detail + "\x00" + ig.Lease.Key() + "\x00" + string(attrs)
}
