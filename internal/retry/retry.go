// Package retry holds the one capped, jittered exponential backoff and the
// context-aware sleep that the Agent and the stores retry with. It keeps no
// global state: each Backoff is owned by one retry loop. It is not a retry
// driver: callers decide what to retry, log the delay and sleep.
package retry

import (
	"context"
	"math/rand/v2"
	"time"
)

// Backoff is a capped exponential backoff with jitter: the n-th delay is
// drawn from [d/2, d], where d is Min doubled n-1 times, up to Max. Jitter
// keeps many nodes from retrying against a store in lockstep after an
// outage. The zero Backoff returns 0 delays; set Min and Max (0 < Min <=
// Max). A Backoff is not safe for concurrent use.
type Backoff struct {
	// Min is the first delay's upper bound. Required.
	Min time.Duration
	// Max caps the upper bound. Required.
	Max time.Duration
	// Rand returns a random number in [0, n) for n > 0. Optional: nil uses
	// math/rand/v2's Int64N. Stores that take a seeded source pass theirs.
	Rand func(n int64) int64

	cur time.Duration
}

// Next returns the next delay and grows the bound for the one after.
func (b *Backoff) Next() time.Duration {
	if b.cur == 0 {
		b.cur = b.Min
	} else {
		b.cur = min(b.cur*2, b.Max)
	}
	half := b.cur / 2
	return half + time.Duration(b.randN(int64(b.cur-half)+1))
}

// Reset starts the backoff over: the next delay is bounded by Min again.
func (b *Backoff) Reset() { b.cur = 0 }

func (b *Backoff) randN(n int64) int64 {
	if n <= 0 {
		return 0
	}
	if b.Rand != nil {
		return b.Rand(n)
	}
	return rand.Int64N(n)
}

// Sleep waits d or until ctx ends. It returns nil when d elapsed, and
// ctx.Err() when ctx ended first (or had already ended).
func Sleep(ctx context.Context, d time.Duration) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return nil
	}
}
