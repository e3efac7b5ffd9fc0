package extension

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"math/rand/v2"
	"slices"
	"sync"
	"time"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
)

// change is the work for one peer key: remove the old peer, add the new
// one, or both (in that order).
type change struct {
	key      string
	old, new *peer
	lease    lease.Lease // for the PeerError
}

// outcome is what running a change left.
type outcome struct {
	key     string
	removed bool  // old is no longer added
	added   *peer // new is added
	err     error
}

// desired converts peers to the set of peers to be added, skipping other
// backend types and the own subnets; a peer whose data is unusable yields
// a PeerError.
func (n *Network) desired(peers []lease.Lease) (map[string]peer, map[string]lease.Lease, []error) {
	want := map[string]peer{}
	leases := map[string]lease.Lease{}
	var errs []error
	for _, l := range peers {
		if l.Attrs.BackendType != Type {
			n.log.Debug("skipping peer of another backend", "subnet", l.String(), "backend_type", l.Attrs.BackendType)
			continue
		}
		if (l.Subnet.IsValid() && l.Subnet == n.own.Subnet) || (l.IPv6Subnet.IsValid() && l.IPv6Subnet == n.own.IPv6Subnet) {
			continue
		}
		p, err := peerOf(l)
		if err != nil {
			errs = append(errs, &flannel.PeerError{Lease: l, Err: err})
			continue
		}
		want[p.key()], leases[p.key()] = p, l
	}
	return want, leases, errs
}

// plan lists the changes that turn added into want, in key order. It has
// no side effects.
func plan(added, want map[string]peer, leases map[string]lease.Lease) []change {
	var out []change
	keys := slices.Sorted(maps.Keys(added))
	for k := range want {
		if _, ok := added[k]; !ok {
			keys = append(keys, k)
		}
	}
	slices.Sort(keys)
	for _, k := range keys {
		a, had := added[k]
		w, wanted := want[k]
		if had && wanted && a == w {
			continue
		}
		c := change{key: k, lease: a.lease()}
		if had {
			c.old = &a
		}
		if wanted {
			c.new, c.lease = &w, leases[k]
		}
		out = append(out, c)
	}
	return out
}

// apply runs the changes for peers (the Reconciler calls it with its lock held) and records the outcome.
func (n *Network) apply(ctx context.Context, peers []lease.Lease) error {
	want, leases, errs := n.desired(peers)
	changes := plan(n.added, want, leases)
	now := time.Now()
	var due []change
	for _, c := range changes {
		if a := n.failed[c.key]; a != nil && now.Before(a.next) {
			errs = append(errs, &flannel.PeerError{Lease: c.lease, Err: fmt.Errorf("%w (retry in %v)", a.err, a.next.Sub(now).Round(time.Millisecond))})
			continue
		}
		due = append(due, c)
	}
	// Forget retry state of peers that need nothing any more.
	pending := map[string]bool{}
	for _, c := range changes {
		pending[c.key] = true
	}
	for k := range n.failed {
		if !pending[k] {
			delete(n.failed, k)
		}
	}
	dirty := false
	for _, o := range n.runAll(ctx, due) {
		if o.removed {
			delete(n.added, o.key)
			dirty = true
		}
		if o.added != nil {
			n.added[o.key] = *o.added
			dirty = true
		}
		if o.err == nil {
			delete(n.failed, o.key)
			continue
		}
		c := changeOf(due, o.key)
		errs = append(errs, &flannel.PeerError{Lease: c.lease, Err: o.err})
		if ctx.Err() == nil {
			n.backoff(o.key, o.err, now)
		}
	}
	if dirty {
		if err := n.state.save(n.added); err != nil {
			errs = append(errs, err)
		}
	}
	n.sched.set(n.nextRetry())
	return errors.Join(errs...)
}

func changeOf(cs []change, key string) change {
	for _, c := range cs {
		if c.key == key {
			return c
		}
	}
	return change{}
}

// backoff records a failure of key: the next attempt waits RetryMin after
// the first failure, twice as long after each further one up to RetryMax,
// with up to 10% jitter.
func (n *Network) backoff(key string, err error, now time.Time) {
	a := n.failed[key]
	if a == nil {
		a = &attempt{}
		n.failed[key] = a
	}
	a.failures++
	d := n.opts.RetryMin
	for i := 1; i < a.failures && d < n.opts.RetryMax; i++ {
		d *= 2
	}
	d = min(d, n.opts.RetryMax)
	d += time.Duration(rand.Int64N(int64(d)/10 + 1))
	a.next, a.err = now.Add(d), err
	n.log.Warn("peer command failed; retrying", "peer", key, "failures", a.failures, "retry_in", d, "err", err)
}

// nextRetry is the earliest due retry, zero when none.
func (n *Network) nextRetry() time.Time {
	var due time.Time
	for _, a := range n.failed {
		if due.IsZero() || a.next.Before(due) {
			due = a.next
		}
	}
	return due
}

// runAll runs the changes, Options.Parallel at a time, and returns their
// outcomes in the order of cs.
func (n *Network) runAll(ctx context.Context, cs []change) []outcome {
	out := make([]outcome, len(cs))
	sem := make(chan struct{}, n.opts.Parallel)
	var wg sync.WaitGroup
	for i, c := range cs {
		wg.Go(func() {
			select {
			case sem <- struct{}{}:
			case <-ctx.Done():
				out[i] = outcome{key: c.key, err: ctx.Err()}
				return
			}
			defer func() { <-sem }()
			out[i] = n.runOne(ctx, c)
		})
	}
	wg.Wait()
	return out
}

// runOne removes c.old and then adds c.new. An unset command counts as
// run.
func (n *Network) runOne(ctx context.Context, c change) outcome {
	o := outcome{key: c.key}
	log := n.log.With("peer", c.key)
	if c.old != nil {
		if line := n.cmds.SubnetRemove; line != "" {
			if _, err := n.cmd.run(ctx, "SubnetRemoveCommand", line, c.old.vars(), c.old.Data, log); err != nil {
				o.err = err
				return o
			}
		}
		o.removed = true
		log.Info("peer removed", "public_ip", str(c.old.PublicIP), "public_ipv6", str(c.old.PublicIPv6))
	}
	if c.new != nil {
		if line := n.cmds.SubnetAdd; line != "" {
			if _, err := n.cmd.run(ctx, "SubnetAddCommand", line, c.new.vars(), c.new.Data, log); err != nil {
				o.err = err
				return o
			}
		}
		o.added = c.new
		log.Info("peer added", "public_ip", str(c.new.PublicIP), "public_ipv6", str(c.new.PublicIPv6))
	}
	return o
}
