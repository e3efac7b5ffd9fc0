package kubestore

import (
	"context"
	"fmt"
	"math/rand/v2"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/flannelkit/flannel/internal/retry"
	"github.com/flannelkit/flannel/lease"
)

// Keep watches this node's Node until ctx ends, and then returns nil.
// Kubernetes leases do not expire, so nothing is renewed. It returns an
// error wrapping lease.ErrLeaseLost when the Node is deleted or its
// podCIDR(s) no longer match own. With SetNodeNetworkUnavailable it first
// marks the node's network up (see MarkReady), retrying until that works.
// API failures are retried with capped, jittered backoff for as long as
// ctx lives; a broken watch is resumed after reading the Node again.
func (s *Store) Keep(ctx context.Context, own lease.Lease) error {
	needReady := s.setNetUp
	bo := retry.Backoff{Min: s.retryMin, Max: s.retryMax}
	for ctx.Err() == nil {
		rctx, cancel := s.reqCtx(ctx)
		n, err := s.nodes.Get(rctx, s.node, metav1.GetOptions{})
		cancel()
		switch {
		case apierrors.IsNotFound(err):
			return fmt.Errorf("node %s deleted: %w", s.node, lease.ErrLeaseLost)
		case err != nil:
			if ctx.Err() != nil {
				return nil
			}
			d := bo.Next()
			s.log.Warn("keeping lease: reading node failed; retrying", "node", s.node, "error", err, "retry_in", d)
			_ = retry.Sleep(ctx, d)
			continue
		}
		if err := s.check(n, own); err != nil {
			return err
		}
		if needReady {
			if err := s.MarkReady(ctx); err != nil {
				s.log.Warn("setting NetworkUnavailable=False failed; retrying", "node", s.node, "error", err)
			} else {
				needReady = false
				s.log.Info("node condition NetworkUnavailable=False set", "node", s.node)
			}
		}
		progressed, err := s.followOwn(ctx, n.ResourceVersion, own)
		if err != nil {
			return err
		}
		if progressed {
			bo.Reset()
		}
		if ctx.Err() != nil {
			return nil
		}
		d := bo.Next()
		if needReady || !progressed {
			_ = retry.Sleep(ctx, d)
		}
	}
	return nil
}

// check returns ErrLeaseLost when n's podCIDRs differ from own.
func (s *Store) check(n *corev1.Node, own lease.Lease) error {
	v4, v6, err := s.podCIDRs(fieldsOf(n))
	if err != nil {
		return fmt.Errorf("node %s: %w: %w", s.node, lease.ErrLeaseLost, err)
	}
	if v4 != own.Subnet || v6 != own.IPv6Subnet {
		got := lease.Lease{Subnet: v4, IPv6Subnet: v6}
		return fmt.Errorf("node %s podCIDRs changed from %s to %s: %w", s.node, own, got, lease.ErrLeaseLost)
	}
	return nil
}

// followOwn watches the own Node from rv. It returns when the watch ends
// (nil error; the caller reads the Node again) or the lease is lost, and
// reports whether any event arrived.
func (s *Store) followOwn(ctx context.Context, rv string, own lease.Lease) (bool, error) {
	timeout := int64(300 + rand.IntN(300))
	w, err := s.nodes.Watch(ctx, metav1.ListOptions{
		FieldSelector:   fields.OneTermEqualSelector("metadata.name", s.node).String(),
		ResourceVersion: rv,
		TimeoutSeconds:  &timeout,
	})
	if err != nil {
		if ctx.Err() == nil {
			s.log.Warn("keeping lease: watching node failed; retrying", "node", s.node, "error", err)
		}
		return false, nil
	}
	defer w.Stop()
	progressed := false
	for {
		select {
		case <-ctx.Done():
			return progressed, nil
		case ev, ok := <-w.ResultChan():
			if !ok {
				return progressed, nil
			}
			switch ev.Type {
			case watch.Deleted:
				return true, fmt.Errorf("node %s deleted: %w", s.node, lease.ErrLeaseLost)
			case watch.Added, watch.Modified:
				progressed = true
				if n, ok := ev.Object.(*corev1.Node); ok {
					if err := s.check(n, own); err != nil {
						return true, err
					}
				}
			case watch.Error:
				s.log.Info("node watch ended; reading the node again", "node", s.node, "error", apierrors.FromObject(ev.Object))
				return progressed, nil
			}
		}
	}
}
