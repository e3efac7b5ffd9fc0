package hostgw

import (
	"context"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/backend"
)

const (
	minResubscribe = 200 * time.Millisecond
	maxResubscribe = 30 * time.Second
)

// Run repairs drift until ctx ends: it re-applies the last peer set every
// RepairInterval and right after one of our routes on the external
// interface is deleted (a route netlink subscription in env.NS; without an
// open NS only the periodic repair runs). Nothing is repaired before the
// first Apply, so routes of a previous run stay until the caller has said
// which peers exist. Repair failures are logged and retried at the next
// tick; a failing subscription is retried with capped backoff. Run joins
// all its goroutines and returns nil when ctx ends.
func (n *Network) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	kick := make(chan struct{}, 1)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	if n.env.NS.IsOpen() {
		wg.Go(func() { n.watchRoutes(ctx, kick) })
	} else {
		n.log.Info("no namespace handle: repairing on a timer only", "interval", n.interval)
	}

	ticker := time.NewTicker(n.interval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-ticker.C:
			n.repair(ctx, "periodic")
		case <-kick:
			n.repair(ctx, "route deleted")
		}
	}
}

func (n *Network) repair(ctx context.Context, why string) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.applied {
		return
	}
	if err := n.applyLocked(ctx); err != nil && ctx.Err() == nil {
		n.log.Warn("repair failed", "trigger", why, "err", err)
	}
}

// watchRoutes subscribes to route changes in the node namespace and kicks
// a repair when one of ours on the external interface goes away, and after
// every (re)subscription since events may have been missed.
func (n *Network) watchRoutes(ctx context.Context, kick chan<- struct{}) {
	poke := func() {
		select {
		case kick <- struct{}{}:
		default:
		}
	}
	backoff := minResubscribe
	for {
		ch := make(chan netlink.RouteUpdate, 64)
		done := make(chan struct{})
		ns := n.env.NS
		err := netlink.RouteSubscribeWithOptions(ch, done, netlink.RouteSubscribeOptions{
			Namespace: &ns,
			ErrorCallback: func(err error) {
				if ctx.Err() == nil {
					n.log.Debug("route subscription", "err", err)
				}
			},
		})
		if err != nil {
			close(done)
			n.log.Warn("route subscription failed; repairing on a timer meanwhile", "err", err, "retry_in", backoff)
		} else {
			poke()
			started := time.Now()
			n.consume(ctx, ch, poke)
			close(done)
			for range ch { // until the receiver goroutine has exited
			}
			if ctx.Err() != nil {
				return
			}
			if time.Since(started) > maxResubscribe {
				backoff = minResubscribe
			}
			n.log.Warn("route subscription ended; resubscribing", "retry_in", backoff)
		}
		t := time.NewTimer(backoff)
		select {
		case <-ctx.Done():
			t.Stop()
			return
		case <-t.C:
		}
		backoff = min(backoff*2, maxResubscribe)
	}
}

// consume reads updates until ctx ends or the subscription closes ch.
func (n *Network) consume(ctx context.Context, ch <-chan netlink.RouteUpdate, poke func()) {
	for {
		select {
		case <-ctx.Done():
			return
		case u, ok := <-ch:
			if !ok {
				return
			}
			if u.Type == unix.RTM_DELROUTE && u.Route.Protocol == backend.RouteProtocol && u.Route.LinkIndex == n.env.Iface.Index {
				poke()
			}
		}
	}
}
