package flannel

import (
	"math/rand/v2"
	"time"
)

// backoff is a capped exponential backoff with jitter: each delay is drawn
// from [d/2, d] where d doubles from min up to max. Jitter keeps many
// agents from retrying against a store in lockstep.
type backoff struct {
	min, max, cur time.Duration
}

func (a *Agent) newBackoff() *backoff {
	return &backoff{min: a.opts.RetryMin, max: a.opts.RetryMax}
}

func (b *backoff) next() time.Duration {
	if b.cur == 0 {
		b.cur = b.min
	} else {
		b.cur = min(b.cur*2, b.max)
	}
	half := b.cur / 2
	return half + rand.N(b.cur-half+1)
}

func (b *backoff) reset() { b.cur = 0 }
