package backend

import (
	"context"
	"errors"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netns"
	"go.uber.org/goleak"
)

// fakeSub is a Subscribe that fails the first fails calls, then delivers
// updates and ends the subscription (closing ch) once they are sent.
type fakeSub struct {
	mu      sync.Mutex
	calls   int
	fails   int
	updates []int
}

func (f *fakeSub) subscribe(ch chan int, done chan struct{}, _ netns.NsHandle, onErr func(error)) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls++
	if f.calls <= f.fails {
		return errors.New("subscribe refused")
	}
	updates := f.updates
	go func() {
		defer close(ch)
		for _, u := range updates {
			select {
			case ch <- u:
			case <-done:
				return
			}
		}
		onErr(errors.New("socket closed"))
	}()
	return nil
}

func (f *fakeSub) callCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.calls
}

func TestWatchResubscribesAndFilters(t *testing.T) {
	defer goleak.VerifyNone(t)
	f := &fakeSub{fails: 2, updates: []int{1, 2, 3, 4}}
	var mu sync.Mutex
	var pokes []string
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() {
		defer close(done)
		watch(ctx, slog.New(slog.DiscardHandler), netns.None(), "thing", f.subscribe,
			func(u int) bool { return u%2 == 0 },
			func(why string) {
				mu.Lock()
				pokes = append(pokes, why)
				mu.Unlock()
			}, nil)
	}()
	// Two refusals (200 ms, 400 ms backoff), then a subscription that
	// ends after its updates, then (800 ms later) the next one.
	require.Eventually(t, func() bool { return f.callCount() >= 4 }, 20*time.Second, 10*time.Millisecond)
	cancel()
	<-done
	mu.Lock()
	defer mu.Unlock()
	require.GreaterOrEqual(t, len(pokes), 3)
	assert.Equal(t, []string{"thing subscribed", "thing event", "thing event"}, pokes[:3], "a poke on subscribing and one per relevant update")
}

func TestWatchStopsWhileWaitingToRetry(t *testing.T) {
	defer goleak.VerifyNone(t)
	f := &fakeSub{fails: 1 << 30}
	ctx, cancel := context.WithCancel(t.Context())
	done := make(chan struct{})
	go func() {
		defer close(done)
		watch(ctx, slog.New(slog.DiscardHandler), netns.None(), "thing", f.subscribe, func(int) bool { return true }, func(string) {}, nil)
	}()
	require.Eventually(t, func() bool { return f.callCount() >= 1 }, 5*time.Second, 5*time.Millisecond)
	cancel()
	<-done
}

func TestRepairLoop(t *testing.T) {
	defer goleak.VerifyNone(t)
	ctx, cancel := context.WithCancel(t.Context())
	var mu sync.Mutex
	whys := map[string]int{}
	watcherDone := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		RepairLoop(ctx, 20*time.Millisecond, func(_ context.Context, why string) {
			mu.Lock()
			whys[why]++
			mu.Unlock()
		}, func(ctx context.Context, poke func(string)) {
			defer close(watcherDone)
			poke("link event")
			<-ctx.Done()
		})
	}()
	require.Eventually(t, func() bool {
		mu.Lock()
		defer mu.Unlock()
		return whys["link event"] == 1 && whys["periodic"] >= 2
	}, 10*time.Second, 5*time.Millisecond)
	cancel()
	<-done
	select {
	case <-watcherDone:
	default:
		t.Fatal("RepairLoop returned before its watcher")
	}
}
