package vxlan

import (
	"context"
	"net"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

const (
	minResubscribe = 200 * time.Millisecond
	maxResubscribe = 30 * time.Second
)

// Run repairs drift until ctx ends: it re-applies the last peer set every
// RepairInterval (fixing neighbour, FDB and route entries deleted or
// changed by hand) and right away when a flannel device is deleted or set
// down (a link netlink subscription in env.NS; without an open NS only the
// periodic repair runs), recreating the device with its MAC and replaying
// every peer. Nothing is repaired before the first Apply, so entries of a
// previous run stay until the caller has said which peers exist. Repair
// failures are logged and retried; a failing subscription is retried with
// capped backoff and is never fatal. Run joins all its goroutines and
// returns nil when ctx ends.
func (n *Network) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	kick := make(chan struct{}, 1)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		wg.Wait()
	}()
	if n.env.NS.IsOpen() {
		wg.Go(func() { n.watchLinks(ctx, kick) })
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
		case <-kick:
			n.repair(ctx, "device deleted or down")
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

// watchLinks subscribes to link changes in the node namespace and kicks a
// repair when a flannel device goes away or down, and after every
// (re)subscription since events may have been missed.
func (n *Network) watchLinks(ctx context.Context, kick chan<- struct{}) {
	poke := func() {
		select {
		case kick <- struct{}{}:
		default:
		}
	}
	names := map[string]bool{}
	for _, d := range n.devs {
		names[d.spec.name] = true
	}
	backoff := minResubscribe
	for {
		ch := make(chan netlink.LinkUpdate, 64)
		done := make(chan struct{})
		ns := n.env.NS
		err := netlink.LinkSubscribeWithOptions(ch, done, netlink.LinkSubscribeOptions{
			Namespace: &ns,
			ErrorCallback: func(err error) {
				if ctx.Err() == nil {
					n.log.Debug("link subscription", "err", err)
				}
			},
		})
		if err != nil {
			close(done)
			n.log.Warn("link subscription failed; repairing on a timer meanwhile", "err", err, "retry_in", backoff)
		} else {
			poke()
			started := time.Now()
			n.consume(ctx, ch, names, poke)
			close(done)
			for range ch { // until the receiver goroutine has exited
			}
			if ctx.Err() != nil {
				return
			}
			if time.Since(started) > maxResubscribe {
				backoff = minResubscribe
			}
			n.log.Warn("link subscription ended; resubscribing", "retry_in", backoff)
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
func (n *Network) consume(ctx context.Context, ch <-chan netlink.LinkUpdate, names map[string]bool, poke func()) {
	for {
		select {
		case <-ctx.Done():
			return
		case u, ok := <-ch:
			if !ok {
				return
			}
			if u.Link == nil || !names[u.Link.Attrs().Name] {
				continue
			}
			if u.Header.Type == unix.RTM_DELLINK || u.Link.Attrs().Flags&net.FlagUp == 0 {
				poke()
			}
		}
	}
}
