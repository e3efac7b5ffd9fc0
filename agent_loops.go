package flannel

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync/atomic"
	"time"

	"github.com/flannelkit/flannel/internal/retry"
	"github.com/flannelkit/flannel/lease"
)

// watchLoop runs Store.Watch until ctx ends, restarting it with backoff when
// it fails. The store is expected to recover by itself (relist); this only
// guards against a watch that returns.
func (a *Agent) watchLoop(ctx context.Context, out *latest[lease.Snapshot]) error {
	bo := a.newBackoff()
	for {
		var delivered atomic.Bool
		began := time.Now()
		err := a.opts.Store.Watch(ctx, func(s lease.Snapshot) {
			delivered.Store(true)
			out.put(s)
		})
		if ctx.Err() != nil {
			return nil
		}
		if err == nil {
			err = errors.New("watch ended early")
		}
		// A watch that worked for a while starts the backoff over; one
		// that fails right after its first snapshot keeps backing off.
		if delivered.Load() && time.Since(began) >= a.opts.RetryMax {
			bo.Reset()
		}
		if a.opts.OnWatchRestart != nil {
			a.opts.OnWatchRestart(err)
		}
		d := bo.Next()
		a.log.Warn("lease watch failed; restarting", "error", err, "retry_in", d)
		if retry.Sleep(ctx, d) != nil {
			return nil
		}
	}
}

// applier applies the latest snapshot's peers to the network each time a
// new one arrives. A failed Apply is retried after a capped, jittered
// backoff, or at once when a new snapshot arrives (new information; the
// backoff keeps growing while Apply keeps failing). Snapshots arriving
// while Apply runs are coalesced: the next call uses the newest one.
type applier struct {
	a       *Agent
	r       *run
	in      *latest[lease.Snapshot]
	bo      *retry.Backoff
	pending *time.Timer // the retry of a failed Apply; nil when none
	warned  peerWarnings
}

func (a *Agent) newApplier(r *run, in *latest[lease.Snapshot]) *applier {
	return &applier{a: a, r: r, in: in, bo: a.newBackoff()}
}

// stop cancels the pending retry, if any.
func (p *applier) stop() {
	if p.pending != nil {
		p.pending.Stop()
		p.pending = nil
	}
}

// untilApplied applies until the peers seen were applied (all of them, or
// all but peers whose *PeerError is being retried). It reports false when
// ctx ended first.
func (p *applier) untilApplied(ctx context.Context) bool {
	for {
		applied, alive := p.next(ctx)
		if !alive {
			return false
		}
		if applied {
			return true
		}
	}
}

// loop applies until ctx ends.
func (p *applier) loop(ctx context.Context) {
	for {
		if _, alive := p.next(ctx); !alive {
			return
		}
	}
}

// next waits for a new snapshot or the pending retry and applies the
// newest peers once, recording their number when they were applied (as
// for untilApplied). alive is false once ctx ended.
func (p *applier) next(ctx context.Context) (applied, alive bool) {
	var retryC <-chan time.Time
	if p.pending != nil {
		retryC = p.pending.C
	}
	select {
	case <-ctx.Done():
		return false, false
	case <-p.in.signal:
	case <-retryC:
	}
	p.stop()
	snap, ok := p.in.get()
	if !ok {
		return false, true
	}
	a := p.a
	peers := a.peers(p.r.own, snap.Leases)
	began := time.Now()
	a.setApplying(began)
	err := p.r.network.Apply(ctx, peers)
	a.setApplying(time.Time{})
	if ctx.Err() != nil {
		return false, false
	}
	if a.opts.OnApply != nil {
		a.opts.OnApply(len(peers), time.Since(began), err)
	}
	var peerOnly bool
	peerOnly, p.warned = a.logApplyError(err, len(peers), p.warned)
	applied = err == nil || peerOnly
	if applied {
		a.update(func(m *mutable) { m.state.Peers = len(peers) })
	}
	if err == nil {
		p.bo.Reset()
		return true, true
	}
	d := p.bo.Next()
	a.log.Debug("retrying apply", "retry_in", d)
	p.pending = time.NewTimer(d)
	return applied, true
}

// peers returns every lease but own. A lease sharing only one of own's
// subnets is a conflict (two nodes claim one subnet); it is dropped too,
// with a warning, since routing our own subnet away would cut our pods off.
// The stores leave conflicts out already (lease.Config.Peers) and deliver
// own first (lease.Config.PeerLeases, lease.Feed), so the peer set is
// handed on without a copy when own is first, last or absent.
func (a *Agent) peers(own lease.Lease, all []lease.Lease) []lease.Lease {
	claims := func(l lease.Lease) bool { return claimsOwn(own, l) }
	first := slices.IndexFunc(all, claims)
	switch {
	case first < 0:
		return all
	case first == len(all)-1 && all[first].SameSubnets(own):
		return all[:first:first]
	case first == 0 && all[0].SameSubnets(own) && !slices.ContainsFunc(all[1:], claims):
		return all[1:]
	}
	out := make([]lease.Lease, first, len(all)-1)
	copy(out, all[:first])
	for _, l := range all[first:] {
		switch {
		case !claimsOwn(own, l):
			out = append(out, l)
		case !l.SameSubnets(own):
			a.log.Warn("ignoring peer lease that shares this node's subnet", "peer", l, "own", own)
		}
	}
	return out
}

// claimsOwn reports whether l holds one of own's subnets.
func claimsOwn(own, l lease.Lease) bool {
	return (own.Subnet.IsValid() && l.Subnet == own.Subnet) ||
		(own.IPv6Subnet.IsValid() && l.IPv6Subnet == own.IPv6Subnet)
}

// logApplyError logs err and reports whether it consists only of
// *PeerError (the rest of the peers were programmed). A peer that cannot
// be programmed is warned about once per change of its lease: warned holds
// what the previous call warned about and the returned set replaces it, so
// retries of the same failing lease log at debug level only, and a peer
// that recovers and fails again is warned about again.
func (a *Agent) logApplyError(err error, n int, warned peerWarnings) (peerOnly bool, now peerWarnings) {
	if err == nil {
		a.log.Debug("peers applied", "peers", n)
		return false, nil
	}
	peerOnly, now = true, peerWarnings{}
	for _, e := range leaves(err) {
		var pe *PeerError
		if errors.As(e, &pe) {
			key, value := pe.Lease.Key(), leaseValue(pe.Lease)
			level := slog.LevelWarn
			if warned[key] == value {
				level = slog.LevelDebug
			}
			now[key] = value
			a.log.Log(context.Background(), level, "peer not programmed; will retry", "peer", pe.Lease.String(),
				"public_ip", peerIP(pe.Lease), "error", pe.Err)
			continue
		}
		peerOnly = false
		a.log.Warn("apply peers failed; will retry", "peers", n, "error", e)
	}
	return peerOnly, now
}

// peerWarnings maps the key of each peer last warned about to its lease
// value then (see leaseValue).
type peerWarnings map[string]string

// leaseValue is a lease's whole published value: a change to any of it is
// a new lease to warn about.
func leaseValue(l lease.Lease) string {
	return fmt.Sprintf("%s|%s|%s|%s|%s|%s", l.Key(), l.Attrs.PublicIP, l.Attrs.PublicIPv6,
		l.Attrs.BackendType, l.Attrs.BackendData, l.Attrs.BackendV6Data)
}

// leaves flattens err into the errors it joins (errors.Join, fmt.Errorf
// with several %w, through single wrappers), stopping at *PeerError.
func leaves(err error) []error {
	for e := err; e != nil; {
		if _, ok := e.(*PeerError); ok {
			return []error{e}
		}
		if j, ok := e.(interface{ Unwrap() []error }); ok {
			var out []error
			for _, x := range j.Unwrap() {
				out = append(out, leaves(x)...)
			}
			return out
		}
		u, ok := e.(interface{ Unwrap() error })
		if !ok {
			break
		}
		e = u.Unwrap()
	}
	return []error{err}
}

// keepLoop holds the lease until ctx ends. On loss it re-acquires, asking
// for the same subnets: the same ones continue silently, different ones
// end Run with a *SubnetChangedError.
func (a *Agent) keepLoop(ctx context.Context, r *run) error {
	bo := a.newBackoff()
	own, attrs := r.own, r.attrs
	for {
		began := time.Now()
		published, err := a.keepUntilPublish(ctx, own, r.publish)
		if ctx.Err() != nil {
			return nil
		}
		if published != nil {
			// The backend publishes new attributes (an ipsec rekey): write
			// them with the lease, then keep that.
			attrs = a.fillAttrs(r.cfg, *published)
			if own, err = a.rebind(ctx, own, attrs); err != nil {
				return unlessDone(ctx, err)
			}
			a.log.Info("lease attributes published", "lease", own, "backend_type", attrs.BackendType)
			continue
		}
		if time.Since(began) >= a.opts.RetryMax {
			bo.Reset() // it held the lease for a while: start over
		}
		if err == nil {
			err = errors.New("keep ended early")
		}
		if a.opts.OnKeepError != nil {
			a.opts.OnKeepError(err)
		}
		if !errors.Is(err, lease.ErrLeaseLost) {
			d := bo.Next()
			a.log.Warn("keeping lease failed; retrying", "lease", own, "error", err, "retry_in", d)
			if retry.Sleep(ctx, d) != nil {
				return nil
			}
			continue
		}

		a.log.Warn("lease lost; re-acquiring", "lease", own, "error", err)
		if own, err = a.rebind(ctx, own, attrs); err != nil {
			return unlessDone(ctx, err)
		}
		a.log.Info("lease re-acquired", "lease", own)
		bo.Reset()
	}
}

// rebind re-acquires the lease with attrs, asking for own's subnets, and
// records it. It returns a *SubnetChangedError when the store could only
// give different subnets, and reacquire's error when it gave none.
func (a *Agent) rebind(ctx context.Context, own lease.Lease, attrs lease.Attrs) (lease.Lease, error) {
	got, err := a.reacquire(ctx, attrs, own)
	if err != nil {
		return lease.Lease{}, err
	}
	if !got.SameSubnets(own) {
		a.log.Error("lease re-acquired with different subnets; pods must move", "old", own, "new", got)
		return lease.Lease{}, &SubnetChangedError{Old: own, New: got}
	}
	a.update(func(m *mutable) { m.state.Lease = got })
	return got, nil
}

// keepUntilPublish runs Store.Keep(own) until it returns or the backend
// publishes new attributes; then it stops Keep (joining it) and returns
// them. Keep must restart with the new lease: stores that renew by writing
// the value again would otherwise put the old attributes back.
func (a *Agent) keepUntilPublish(ctx context.Context, own lease.Lease, pub *latest[lease.Attrs]) (*lease.Attrs, error) {
	kctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- a.opts.Store.Keep(kctx, own) }()
	select {
	case err := <-errc:
		return nil, err
	case <-pub.signal:
		cancel()
		<-errc
		attrs, ok := pub.take()
		if !ok {
			return nil, nil
		}
		return &attrs, nil
	}
}

// reacquire retries Acquire with backoff until it succeeds, ctx ends, or
// the network is full.
func (a *Agent) reacquire(ctx context.Context, attrs lease.Attrs, own lease.Lease) (lease.Lease, error) {
	bo := a.newBackoff()
	for {
		got, err := a.acquire(ctx, lease.Request{Attrs: attrs, Previous: own})
		if err == nil {
			return got, nil
		}
		if errors.Is(err, lease.ErrNoFreeSubnet) || ctx.Err() != nil {
			return lease.Lease{}, fmt.Errorf("re-acquire lost lease %s: %w", own, err)
		}
		d := bo.Next()
		a.log.Warn("re-acquiring lease failed; retrying", "lease", own, "error", err, "retry_in", d)
		if retry.Sleep(ctx, d) != nil {
			return lease.Lease{}, ctx.Err()
		}
	}
}
