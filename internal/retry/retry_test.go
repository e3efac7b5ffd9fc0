package retry

import (
	"context"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestBackoffCappedJittered(t *testing.T) {
	t.Parallel()
	b := &Backoff{Min: 10 * time.Millisecond, Max: 80 * time.Millisecond}
	caps := []time.Duration{10, 20, 40, 80, 80, 80}
	for i, c := range caps {
		c *= time.Millisecond
		d := b.Next()
		assert.GreaterOrEqual(t, d, c/2, "step %d", i)
		assert.LessOrEqual(t, d, c, "step %d", i)
	}
	b.Reset()
	assert.LessOrEqual(t, b.Next(), 10*time.Millisecond)
}

func TestBackoffJitterBounds(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		rand func(n int64) int64
		want []time.Duration // for Min 100, Max 400 (ns)
	}{
		{name: "lowest draw", rand: func(int64) int64 { return 0 }, want: []time.Duration{50, 100, 200, 200}},
		{name: "highest draw", rand: func(n int64) int64 { return n - 1 }, want: []time.Duration{100, 200, 400, 400}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			b := &Backoff{Min: 100, Max: 400, Rand: tc.rand}
			for i, w := range tc.want {
				assert.Equal(t, w, b.Next(), "step %d", i)
			}
		})
	}
}

func TestBackoffRandRange(t *testing.T) {
	t.Parallel()
	src := rand.New(rand.NewPCG(1, 2))
	var asked []int64
	b := &Backoff{Min: 10, Max: 15, Rand: func(n int64) int64 {
		asked = append(asked, n)
		return src.Int64N(n)
	}}
	for range 50 {
		d := b.Next()
		assert.GreaterOrEqual(t, d, time.Duration(5))
		assert.LessOrEqual(t, d, time.Duration(15))
	}
	// [d/2, d] inclusive: the source is asked for d-d/2+1 values.
	assert.Equal(t, []int64{6, 9}, asked[:2])
}

func TestBackoffReset(t *testing.T) {
	t.Parallel()
	b := &Backoff{Min: 100, Max: 1600, Rand: func(n int64) int64 { return n - 1 }}
	for range 10 {
		b.Next()
	}
	assert.Equal(t, time.Duration(1600), b.Next())
	b.Reset()
	assert.Equal(t, time.Duration(100), b.Next())
	assert.Equal(t, time.Duration(200), b.Next())
}

func TestBackoffMinEqualsMax(t *testing.T) {
	t.Parallel()
	b := &Backoff{Min: time.Second, Max: time.Second}
	for range 5 {
		d := b.Next()
		assert.GreaterOrEqual(t, d, time.Second/2)
		assert.LessOrEqual(t, d, time.Second)
	}
}

func TestSleepElapses(t *testing.T) {
	t.Parallel()
	require.NoError(t, Sleep(context.Background(), time.Millisecond))
}

func TestSleepCancelled(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Sleep(ctx, time.Hour) }()
	cancel()
	assert.ErrorIs(t, <-done, context.Canceled)
}

func TestSleepAlreadyCancelled(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	// Even a zero delay reports the ended context.
	assert.ErrorIs(t, Sleep(ctx, 0), context.Canceled)
}

func TestSleepDeadline(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithTimeout(context.Background(), time.Millisecond)
	defer cancel()
	assert.ErrorIs(t, Sleep(ctx, time.Hour), context.DeadlineExceeded)
}
