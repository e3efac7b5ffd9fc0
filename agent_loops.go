package flannel

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/flannelkit/flannel/internal/retry"
	"github.com/flannelkit/flannel/lease"
)

// latest hands the newest value from a producer that must never block (a
// store's watch callback, a backend's Env.Publish) to one consumer. put
// replaces a value not yet taken (latest wins) and signal holds at most one
// pending wake-up.
type latest[T any] struct {
	mu     sync.Mutex
	v      T
	have   bool
	signal chan struct{}
}

func newLatest[T any]() *latest[T] { return &latest[T]{signal: make(chan struct{}, 1)} }

func (l *latest[T]) put(v T) {
	l.mu.Lock()
	l.v, l.have = v, true
	l.mu.Unlock()
	select {
	case l.signal <- struct{}{}:
	default:
	}
}

// get returns the newest value, leaving it in place.
func (l *latest[T]) get() (T, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.v, l.have
}

// take returns the newest value and empties the box.
func (l *latest[T]) take() (T, bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	v, ok := l.v, l.have
	var zero T
	l.v, l.have = zero, false
	return v, ok
}

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

// applyLoop applies the latest snapshot's peers to the network each time a
// new one arrives. A failed Apply is retried after a capped, jittered
// backoff, or at once when a new snapshot arrives (new information; the
// backoff keeps growing while Apply keeps failing). Snapshots arriving
// while Apply runs are coalesced: the next call uses the newest one.
func (a *Agent) applyLoop(ctx context.Context, r *run, in *latest[lease.Snapshot]) error {
	bo := a.newBackoff()
	var retry *time.Timer
	var retryC <-chan time.Time
	defer func() {
		if retry != nil {
			retry.Stop()
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-in.signal:
		case <-retryC:
		}
		if retry != nil {
			retry.Stop()
			retry, retryC = nil, nil
		}
		snap, ok := in.get()
		if !ok {
			continue
		}
		peers := a.peers(r.own, snap.Leases)
		began := time.Now()
		a.setApplying(began)
		err := r.network.Apply(ctx, peers)
		a.setApplying(time.Time{})
		if ctx.Err() != nil {
			return nil
		}
		if a.opts.OnApply != nil {
			a.opts.OnApply(len(peers), time.Since(began), err)
		}
		peerOnly := a.logApplyError(err, len(peers))
		if err == nil || peerOnly {
			a.applied(len(peers))
		}
		if err == nil {
			bo.Reset()
			continue
		}
		d := bo.Next()
		a.log.Debug("retrying apply", "retry_in", d)
		retry = time.NewTimer(d)
		retryC = retry.C
	}
}

// peers returns every lease but own. A lease sharing only one of own's
// subnets is a conflict (two nodes claim one subnet); it is dropped too,
// with a warning, since routing our own subnet away would cut our pods off.
func (a *Agent) peers(own lease.Lease, all []lease.Lease) []lease.Lease {
	out := make([]lease.Lease, 0, len(all))
	for _, l := range all {
		same4 := own.Subnet.IsValid() && l.Subnet == own.Subnet
		same6 := own.IPv6Subnet.IsValid() && l.IPv6Subnet == own.IPv6Subnet
		switch {
		case l.SameSubnets(own):
		case same4 || same6:
			a.log.Warn("ignoring peer lease that shares this node's subnet", "peer", l, "own", own)
		default:
			out = append(out, l)
		}
	}
	return out
}

// logApplyError logs err and reports whether it consists only of
// *PeerError (the rest of the peers were programmed).
func (a *Agent) logApplyError(err error, n int) (peerOnly bool) {
	if err == nil {
		a.log.Debug("peers applied", "peers", n)
		return false
	}
	peerOnly = true
	for _, e := range leaves(err) {
		var pe *PeerError
		if errors.As(e, &pe) {
			a.log.Warn("peer not programmed; will retry", "peer", pe.Lease.String(),
				"public_ip", peerIP(pe.Lease), "error", pe.Err)
			continue
		}
		peerOnly = false
		a.log.Warn("apply peers failed; will retry", "peers", n, "error", e)
	}
	return peerOnly
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
			got, err := a.reacquire(ctx, attrs, own)
			if err != nil {
				if ctx.Err() != nil {
					return nil
				}
				return err
			}
			if !got.SameSubnets(own) {
				a.log.Error("lease re-acquired with different subnets; pods must move", "old", own, "new", got)
				return &SubnetChangedError{Old: own, New: got}
			}
			a.log.Info("lease attributes published", "lease", got, "backend_type", attrs.BackendType)
			own = got
			a.mu.Lock()
			a.state.Lease = got
			a.mu.Unlock()
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
		got, err := a.reacquire(ctx, attrs, own)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return err
		}
		if !got.SameSubnets(own) {
			a.log.Error("lease re-acquired with different subnets; pods must move", "old", own, "new", got)
			return &SubnetChangedError{Old: own, New: got}
		}
		a.log.Info("lease re-acquired", "lease", got)
		own = got
		a.mu.Lock()
		a.state.Lease = got
		a.mu.Unlock()
		bo.Reset()
	}
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

// beginRun resets the readiness for a new Run.
func (a *Agent) beginRun() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.state.Ready = false
	a.state.Peers = 0
}

// endRun gives the next Run a fresh Ready channel, so that Ready() called
// between two Runs does not report the previous one's readiness.
func (a *Agent) endRun() {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.state.Ready = false
	if a.readyClosed {
		a.ready = make(chan struct{})
		a.readyClosed = false
	}
}

// applied records a completed Apply and, the first time in a Run, closes
// the Ready channel and calls OnReady.
func (a *Agent) applied(peers int) {
	a.mu.Lock()
	a.state.Peers = peers
	first := !a.readyClosed
	if first {
		a.readyClosed = true
		a.state.Ready = true
		close(a.ready)
	}
	st := a.state
	a.mu.Unlock()
	if first {
		a.log.Info("node ready", "lease", st.Lease, "mtu", st.MTU, "peers", st.Peers)
		if a.opts.OnReady != nil {
			a.opts.OnReady(st)
		}
	}
}

// newBackoff returns a backoff between the agent's retry bounds.
func (a *Agent) newBackoff() *retry.Backoff {
	return &retry.Backoff{Min: a.opts.RetryMin, Max: a.opts.RetryMax}
}

// setApplying records when the running Apply began (zero: none running), so
// that State.ApplyingSince lets a health check see a wedged Apply.
func (a *Agent) setApplying(t time.Time) {
	a.mu.Lock()
	a.state.ApplyingSince = t
	a.mu.Unlock()
}
