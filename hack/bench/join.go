package main

import (
	"context"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/ipconv"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/memstore"
	"github.com/flannelkit/flannel/vxlan"
)

// join measures how long a new peer's lease takes to reach the kernel
// with o.peers peers already programmed.
func join(o options) error {
	nd, err := newNode()
	if err != nil {
		return err
	}
	defer nd.lab.Close()
	store := memstore.New(nd.env.Config, memstore.Options{})
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	ps := synthetic(o.peers + o.joins)
	for _, p := range ps[:o.peers] {
		if _, err := store.Acquire(ctx, lease.Request{Attrs: p.lease().Attrs}); err != nil {
			return err
		}
	}
	b, err := vxlan.New(vxlan.Options{RepairInterval: time.Hour})
	if err != nil {
		return err
	}
	var log *slog.Logger
	if o.verbose {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	agent, err := flannel.NewAgent(flannel.AgentOptions{Store: store, Backend: b, Iface: nd.env.Iface, Handle: nd.n.Handle, NS: nd.n.NS, Logger: log})
	if err != nil {
		return err
	}

	// Route events in the node namespace: when a peer's route appears,
	// its FDB and neighbour entries (written before it) are in.
	var mu sync.Mutex
	seen := map[netip.Prefix]time.Time{}
	arrived := make(chan struct{}, 1)
	ch := make(chan netlink.RouteUpdate, 4096)
	done := make(chan struct{})
	ns := nd.n.NS
	subErr := make(chan error, 1)
	onErr := func(err error) {
		select {
		case subErr <- err:
		default:
		}
	}
	if err := nlsafe.SubscribeRoutes(ch, done, ns, onErr); err != nil {
		return err
	}
	var wg sync.WaitGroup
	defer func() {
		close(done)
		cancel()
		wg.Wait()
	}()
	wg.Go(func() {
		for u := range ch {
			if u.Type != unix.RTM_NEWROUTE || u.Protocol != backend.RouteProtocol {
				continue
			}
			if p, ok := ipconv.PrefixFromIPNet(u.Dst); ok {
				mu.Lock()
				seen[p] = time.Now()
				mu.Unlock()
				select {
				case arrived <- struct{}{}:
				default:
				}
			}
		}
	})
	runErr := make(chan error, 1)
	wg.Go(func() { runErr <- agent.Run(ctx) })
	deadline := time.After(2 * time.Minute)
	for agent.State().Peers < o.peers {
		select {
		case err := <-runErr:
			return fmt.Errorf("agent: %v", err)
		case <-deadline:
			return fmt.Errorf("agent programmed %d of %d peers", agent.State().Peers, o.peers)
		case <-time.After(20 * time.Millisecond):
		}
	}
	var lat []time.Duration
	for _, p := range ps[o.peers:] {
		t0 := time.Now()
		l, err := store.Acquire(ctx, lease.Request{Attrs: p.lease().Attrs})
		if err != nil {
			return err
		}
		for {
			mu.Lock()
			t1, ok := seen[l.Subnet]
			mu.Unlock()
			if ok {
				lat = append(lat, t1.Sub(t0))
				break
			}
			select {
			case <-arrived:
			case err := <-subErr:
				return fmt.Errorf("route subscription: %w", err)
			case <-deadline:
				return fmt.Errorf("lease %s never reached the kernel", l)
			}
		}
	}
	fmt.Printf("scenario=join backend=vxlan peers=%d joins=%d p50_ms=%.2f p99_ms=%.2f max_ms=%.2f rss_mb=%.1f\n",
		o.peers, len(lat), ms(percentile(lat, 0.5)), ms(percentile(lat, 0.99)), ms(percentile(lat, 1)), rssMB())
	return nil
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
