package daemon

import (
	"context"
	"time"
)

// DefaultRenewalPoll is how often watchRenewals reads the lease expiry.
const DefaultRenewalPoll = 30 * time.Second

// watchRenewals counts renewals of the node's lease from the outside: the
// store renews inside Keep and says nothing, so this reads the expiry
// every period and calls renewed when it moved forward by more than the
// period (a renewal pushes it out by nearly the whole TTL; time passing
// only brings it closer). It returns when ctx ends.
func watchRenewals(ctx context.Context, period time.Duration, expiry func(context.Context) (time.Time, bool), renewed func(time.Time)) {
	t := time.NewTicker(period)
	defer t.Stop()
	var last time.Time
	for {
		if e, ok := expiry(ctx); ok {
			if !last.IsZero() && e.Sub(last) > period {
				renewed(e)
			}
			last = e
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
