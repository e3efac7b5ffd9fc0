package backend

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/vishvananda/netns"
)

// Resubscribe backoff of a watch: the first retry waits resubscribeMin,
// each further one twice as long up to resubscribeMax; a subscription that
// lived longer than resubscribeMax starts over at resubscribeMin.
const (
	resubscribeMin = 200 * time.Millisecond
	resubscribeMax = 30 * time.Second
)

// Subscribe opens a netlink subscription in namespace ns that delivers
// updates on ch until done is closed, then closes ch. onErr receives the
// errors the subscription reports while it runs. The vishvananda/netlink
// subscriptions fit through small adapters: internal/nlsafe's
// SubscribeLinks, SubscribeNeighDeletes, SubscribeRoutes, SubscribeRouteDeletes
// and SubscribeXfrm.
type Subscribe[T any] func(ch chan T, done chan struct{}, ns netns.NsHandle, onErr func(error)) error

// watch keeps a subscription open in ns until ctx ends and calls
// poke(what+" event") for every update relevant reports, and once after
// every (re)subscription since updates may have been missed meanwhile. A
// failed or ended subscription is logged and retried with capped backoff;
// it is never fatal. watch returns when ctx ends, after the subscription's
// receiver has exited. health (when set) is told true once a subscription
// is open (before its poke) and false when it failed or ended.
func watch[T any](ctx context.Context, log *slog.Logger, ns netns.NsHandle, what string,
	sub Subscribe[T], relevant func(T) bool, poke func(why string), health func(up bool)) {
	if health == nil {
		health = func(bool) {}
	}
	backoff := resubscribeMin
	for {
		ch := make(chan T, 256)
		done := make(chan struct{})
		err := sub(ch, done, ns, func(err error) {
			if ctx.Err() == nil {
				log.Debug(what+" subscription", "err", err)
			}
		})
		if err != nil {
			close(done)
			health(false)
			log.Warn(what+" subscription failed; repairing on a timer meanwhile", "err", err, "retry_in", backoff)
		} else {
			health(true)
			poke(what + " subscribed")
			started := time.Now()
			consume(ctx, ch, func(u T) {
				if relevant(u) {
					poke(what + " event")
				}
			})
			close(done)
			health(false)
			for range ch { // until the receiver goroutine has exited
			}
			if ctx.Err() != nil {
				return
			}
			if time.Since(started) > resubscribeMax {
				backoff = resubscribeMin
			}
			log.Warn(what+" subscription ended; resubscribing", "retry_in", backoff)
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		backoff = min(backoff*2, resubscribeMax)
	}
}

// consume hands every update to fn until ctx ends or ch is closed.
func consume[T any](ctx context.Context, ch <-chan T, fn func(T)) {
	for {
		select {
		case <-ctx.Done():
			return
		case u, ok := <-ch:
			if !ok {
				return
			}
			fn(u)
		}
	}
}

// Watcher is one event source of a RepairLoop: it runs until ctx ends and
// calls poke with the reason whenever a repair should run.
type Watcher func(ctx context.Context, poke func(why string))

// NetlinkWatcher is a Watcher that keeps a subscription sub open in ns.
func NetlinkWatcher[T any](log *slog.Logger, ns netns.NsHandle, what string, sub Subscribe[T], relevant func(T) bool) Watcher {
	return func(ctx context.Context, poke func(why string)) {
		watch(ctx, log, ns, what, sub, relevant, poke, nil)
	}
}

// NetlinkHealthWatcher is NetlinkWatcher that also reports whether its
// subscription is open: health(true) once it is (before the poke that
// follows every subscription), health(false) when it failed or ended. A
// dataplane that repairs rarely on its timer (ReconcilerConfig.Resync)
// uses it to repair on every tick while it may miss kernel events.
func NetlinkHealthWatcher[T any](log *slog.Logger, ns netns.NsHandle, what string, sub Subscribe[T], relevant func(T) bool, health func(up bool)) Watcher {
	return func(ctx context.Context, poke func(why string)) {
		watch(ctx, log, ns, what, sub, relevant, poke, health)
	}
}

// RepairLoop calls repair(ctx, "periodic") every interval and
// repair(ctx, why) soon after a watcher pokes (pokes coalesce while a
// repair runs), until ctx ends. The watchers run in their own goroutines,
// all joined before RepairLoop returns.
func RepairLoop(ctx context.Context, interval time.Duration, repair func(ctx context.Context, why string), watchers ...Watcher) {
	ctx, cancel := context.WithCancel(ctx)
	kick := make(chan string, 1)
	poke := func(why string) {
		select {
		case kick <- why:
		default:
		}
	}
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	for _, w := range watchers {
		wg.Go(func() { w(ctx, poke) })
	}
	ticker := time.NewTicker(interval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-ticker.C:
			repair(ctx, "periodic")
		case why := <-kick:
			repair(ctx, why)
		}
	}
}
