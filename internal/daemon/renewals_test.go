package daemon

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
)

func TestWatchRenewals(t *testing.T) {
	t.Parallel()
	base := time.Unix(1_000_000, 0)
	// Expiry readings: counting down, a renewal (+1h), unknown, counting
	// down, another renewal.
	readings := []time.Duration{0, -time.Second, -2 * time.Second, time.Hour, -1, time.Hour - time.Second, 2 * time.Hour}
	var mu sync.Mutex
	i := 0
	var got []time.Time
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() {
		defer close(done)
		watchRenewals(ctx, time.Millisecond, func(context.Context) (time.Time, bool) {
			mu.Lock()
			defer mu.Unlock()
			if i >= len(readings) {
				cancel()
				return time.Time{}, false
			}
			r := readings[i]
			i++
			if r == -1 {
				return time.Time{}, false
			}
			return base.Add(r), true
		}, func(e time.Time) {
			mu.Lock()
			defer mu.Unlock()
			got = append(got, e)
		})
	}()
	<-done
	assert.Equal(t, []time.Time{base.Add(time.Hour), base.Add(2 * time.Hour)}, got)
}
