package etcdstore

import (
	"context"
	"time"
)

// backoff is a capped exponential backoff with jitter: each delay is drawn
// from [d/2, d] where d doubles from min up to max. Jitter spreads the
// retries of many nodes after an etcd outage.
type backoff struct {
	s        *Store
	min, max time.Duration
	cur      time.Duration
}

func (s *Store) newBackoff() *backoff {
	return &backoff{s: s, min: s.retryMin, max: s.retryMax}
}

func (b *backoff) next() time.Duration {
	if b.cur == 0 {
		b.cur = b.min
	} else {
		b.cur = min(b.cur*2, b.max)
	}
	half := b.cur / 2
	return half + time.Duration(b.s.randN(int64(b.cur-half)+1))
}

func (b *backoff) reset() { b.cur = 0 }

// sleep waits d or until ctx ends; it reports whether ctx is still alive.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
