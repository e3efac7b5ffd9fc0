package vxlan

import (
	"context"
	"net"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel/backend"
)

const (
	minResubscribe = 200 * time.Millisecond
	maxResubscribe = 30 * time.Second
)

// Run repairs drift until ctx ends: it re-applies the last peer set every
// RepairInterval, and right away when a flannel device is deleted or set
// down (recreating it with its MAC and replaying every peer) or when a
// permanent neighbour or FDB entry on a flannel device, or a route of ours,
// is deleted (netlink subscriptions in env.NS; without an open NS only the
// periodic repair runs; entries added by others only go at the periodic
// repair). Nothing is repaired before the first Apply, so
// entries of a previous run stay until the caller has said which peers
// exist. Repair failures are logged and retried; a failing subscription is
// retried with capped backoff and is never fatal. Run joins all its
// goroutines and returns nil when ctx ends.
func (n *Network) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	kick := make(chan string, 1)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	if n.env.NS.IsOpen() {
		names := map[string]bool{}
		for _, d := range n.devs {
			names[d.spec.name] = true
		}
		wg.Go(func() {
			watch(ctx, n, "link", kick, func(ch chan netlink.LinkUpdate, done chan struct{}, ns *netns.NsHandle, cb func(error)) error {
				return netlink.LinkSubscribeWithOptions(ch, done, netlink.LinkSubscribeOptions{Namespace: ns, ErrorCallback: cb})
			}, func(u netlink.LinkUpdate) bool {
				return u.Link != nil && names[u.Link.Attrs().Name] &&
					(u.Header.Type == unix.RTM_DELLINK || u.Link.Attrs().Flags&net.FlagUp == 0)
			})
		})
		wg.Go(func() {
			watch(ctx, n, "neighbour", kick, func(ch chan netlink.NeighUpdate, done chan struct{}, ns *netns.NsHandle, cb func(error)) error {
				return netlink.NeighSubscribeWithOptions(ch, done, netlink.NeighSubscribeOptions{Namespace: ns, ErrorCallback: cb})
			}, func(u netlink.NeighUpdate) bool {
				// A deleted neighbour is reported NUD_FAILED, whatever it was.
				return u.Type == unix.RTM_DELNEIGH && n.ours(u.LinkIndex, false)
			})
		})
		wg.Go(func() {
			watch(ctx, n, "route", kick, func(ch chan netlink.RouteUpdate, done chan struct{}, ns *netns.NsHandle, cb func(error)) error {
				return netlink.RouteSubscribeWithOptions(ch, done, netlink.RouteSubscribeOptions{Namespace: ns, ErrorCallback: cb})
			}, func(u netlink.RouteUpdate) bool {
				return u.Type == unix.RTM_DELROUTE && u.Protocol == backend.RouteProtocol && n.ours(u.LinkIndex, true)
			})
		})
	} else {
		n.log.Info("no namespace handle: repairing on a timer only", "interval", n.opts.RepairInterval)
	}
	ticker := time.NewTicker(n.opts.RepairInterval)
	defer ticker.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-ticker.C:
			n.repair(ctx, "periodic")
		case why := <-kick:
			n.repair(ctx, why)
		}
	}
}

// ours reports whether link is a flannel device (or, with ext, the
// external interface, where direct routes live). Device indexes change
// when a device is recreated, hence the lock.
func (n *Network) ours(link int, ext bool) bool {
	if ext && link == n.env.Iface.Index {
		return true
	}
	n.devMu.Lock()
	defer n.devMu.Unlock()
	for _, i := range n.devIndex {
		if i == link {
			return true
		}
	}
	return false
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

// watch subscribes with sub in the node namespace and kicks a repair for
// every update relevant reports, and after every (re)subscription since
// events may have been missed. A failed or ended subscription is retried
// with capped backoff until ctx ends.
func watch[T any](ctx context.Context, n *Network, what string, kick chan<- string,
	sub func(ch chan T, done chan struct{}, ns *netns.NsHandle, cb func(error)) error, relevant func(T) bool) {
	poke := func() {
		select {
		case kick <- what + " event":
		default:
		}
	}
	backoff := minResubscribe
	for {
		ch := make(chan T, 256)
		done := make(chan struct{})
		ns := n.env.NS
		err := sub(ch, done, &ns, func(err error) {
			if ctx.Err() == nil {
				n.log.Debug(what+" subscription", "err", err)
			}
		})
		if err != nil {
			close(done)
			n.log.Warn(what+" subscription failed; repairing on a timer meanwhile", "err", err, "retry_in", backoff)
		} else {
			poke()
			started := time.Now()
		loop:
			for {
				select {
				case <-ctx.Done():
					break loop
				case u, ok := <-ch:
					if !ok {
						break loop
					}
					if relevant(u) {
						poke()
					}
				}
			}
			close(done)
			for range ch { // until the receiver goroutine has exited
			}
			if ctx.Err() != nil {
				return
			}
			if time.Since(started) > maxResubscribe {
				backoff = minResubscribe
			}
			n.log.Warn(what+" subscription ended; resubscribing", "retry_in", backoff)
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
