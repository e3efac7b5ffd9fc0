package kubestore

import (
	"context"
	"errors"
	"fmt"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
)

var _ flannel.LeaseFinder = (*Store)(nil)

// FindOwn returns the lease this node's Node object holds from a previous
// run: its podCIDR subnets with the attributes published in its
// annotations. attrs is not used: the Node is this store's NodeName. It
// returns false (and no error) when the Node does not exist or is not a
// flannel node yet (no kube-subnet-manager annotation or no podCIDR), and
// an error naming the annotation when one is malformed. It changes nothing.
func (s *Store) FindOwn(ctx context.Context, _ lease.Attrs) (lease.Lease, bool, error) {
	rctx, cancel := s.reqCtx(ctx)
	defer cancel()
	n, err := s.nodes.Get(rctx, s.node, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return lease.Lease{}, false, nil
	case err != nil:
		return lease.Lease{}, false, fmt.Errorf("get node %s: %w", s.node, err)
	}
	l, err := s.nodeLease(fieldsOf(n), true)
	switch {
	case errors.Is(err, errNotPeer):
		return lease.Lease{}, false, nil
	case err != nil:
		return lease.Lease{}, false, fmt.Errorf("find own lease: %w", err)
	}
	return l, true, nil
}
