package kubestore

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/flannelkit/flannel/lease"
)

// Acquire returns this node's lease: the subnets of its Node's
// spec.podCIDR(s) with req.Attrs, after publishing the attributes in the
// Node's annotations (through the nodes/status subresource, with a merge
// patch of only the keys that changed; nothing is written when none did).
// The public-ip-overwrite and public-ipv6-overwrite annotations, when set
// by an operator, replace req's public IPs. req.Previous is ignored: the
// subnet is the controller manager's choice.
//
// While the Node does not exist or has no podCIDR, Acquire looks again
// every PollInterval until ctx ends, and then returns an error wrapping
// lease.ErrNotAssigned (and ctx's error). A podCIDR outside the network,
// or a missing family of a dual-stack network, is an error naming both.
func (s *Store) Acquire(ctx context.Context, req lease.Request) (lease.Lease, error) {
	t := time.NewTicker(s.poll)
	defer t.Stop()
	var notAssigned error
	for {
		l, err := s.acquireOnce(ctx, req.Attrs)
		switch {
		case err == nil:
			return l, nil
		case errors.Is(err, lease.ErrNotAssigned):
			notAssigned = err
			s.log.Debug("waiting for the node's podCIDR", "node", s.node, "error", err)
		case notAssigned != nil && errors.As(err, new(*lookupError)):
			// Once waiting for an assignment, a failed look (apiserver
			// away, client-go's rate limiter refusing near the deadline)
			// does not end the wait: ctx bounds it, and when ctx ends the
			// caller learns what we were waiting for.
			s.log.Debug("looking for the node's podCIDR failed; still waiting", "node", s.node, "error", err)
		default:
			return l, err
		}
		select {
		case <-ctx.Done():
			return lease.Lease{}, fmt.Errorf("acquire lease: %w: %w", notAssigned, ctx.Err())
		case <-t.C:
		}
	}
}

func (s *Store) acquireOnce(ctx context.Context, attrs lease.Attrs) (lease.Lease, error) {
	rctx, cancel := s.reqCtx(ctx)
	defer cancel()
	n, err := s.nodes.Get(rctx, s.node, metav1.GetOptions{})
	switch {
	case apierrors.IsNotFound(err):
		return lease.Lease{}, fmt.Errorf("node %s does not exist: %w", s.node, lease.ErrNotAssigned)
	case err != nil:
		return lease.Lease{}, &lookupError{node: s.node, err: err}
	}
	v4, v6, err := s.podCIDRs(fieldsOf(n))
	if err != nil {
		return lease.Lease{}, err
	}
	attrs = s.overwrites(n, attrs)
	want, err := s.wantAnnotations(attrs, v4.IsValid(), v6.IsValid())
	if err != nil {
		return lease.Lease{}, err
	}
	changed := map[string]string{}
	for k, v := range want {
		if cur, ok := n.Annotations[k]; !ok || cur != v {
			changed[k] = v
		}
	}
	if len(changed) > 0 {
		patch, err := json.Marshal(map[string]any{"metadata": map[string]any{"annotations": changed}})
		if err != nil {
			return lease.Lease{}, fmt.Errorf("node %s: annotations patch: %w", s.node, err)
		}
		if _, err := s.nodes.Patch(rctx, s.node, types.MergePatchType, patch, metav1.PatchOptions{}, "status"); err != nil {
			return lease.Lease{}, fmt.Errorf("patch annotations of node %s: %w", s.node, err)
		}
		s.log.Info("node annotations written", "node", s.node, "keys", len(changed))
	}
	l := lease.Lease{Subnet: v4, IPv6Subnet: v6, Attrs: attrs}
	if !v4.IsValid() {
		l.Attrs.PublicIP, l.Attrs.BackendData = netip.Addr{}, nil
	}
	if !v6.IsValid() {
		l.Attrs.PublicIPv6, l.Attrs.BackendV6Data = netip.Addr{}, nil
	}
	return l, nil
}

// overwrites applies the operator's public-ip(v6)-overwrite annotations.
// An unparsable one is ignored with a warning.
func (s *Store) overwrites(n *corev1.Node, attrs lease.Attrs) lease.Attrs {
	for _, o := range []struct {
		key string
		is4 bool
		dst *netip.Addr
	}{
		{s.ann.publicIPOverwrite, true, &attrs.PublicIP},
		{s.ann.publicIPv6Overwite, false, &attrs.PublicIPv6},
	} {
		v := n.Annotations[o.key]
		if v == "" {
			continue
		}
		a, err := netip.ParseAddr(v)
		if err != nil || a.Is4() != o.is4 || a.Is4In6() {
			s.log.Warn("ignoring invalid public IP overwrite annotation", "node", n.Name, "annotation", o.key, "value", v)
			continue
		}
		*o.dst = a
	}
	return attrs
}

// wantAnnotations renders attrs as upstream does for the enabled families.
func (s *Store) wantAnnotations(attrs lease.Attrs, v4, v6 bool) (map[string]string, error) {
	m := map[string]string{
		s.ann.subnetKubeManaged: "true",
		s.ann.backendType:       attrs.BackendType,
	}
	if v4 {
		d, err := compactData(attrs.BackendData)
		if err != nil {
			return nil, fmt.Errorf("node %s: backend data: %w", s.node, err)
		}
		if !attrs.PublicIP.IsValid() {
			return nil, fmt.Errorf("node %s: no IPv4 public IP to publish", s.node)
		}
		m[s.ann.backendData], m[s.ann.publicIP] = d, attrs.PublicIP.String()
	}
	if v6 {
		d, err := compactData(attrs.BackendV6Data)
		if err != nil {
			return nil, fmt.Errorf("node %s: backend v6 data: %w", s.node, err)
		}
		if !attrs.PublicIPv6.IsValid() {
			return nil, fmt.Errorf("node %s: no IPv6 public IP to publish", s.node)
		}
		m[s.ann.backendV6Data], m[s.ann.publicIPv6] = d, attrs.PublicIPv6.String()
	}
	return m, nil
}

// compactData renders backend data as upstream writes it: compact JSON,
// "null" when empty.
func compactData(d json.RawMessage) (string, error) {
	t := bytes.TrimSpace(d)
	if len(t) == 0 {
		return "null", nil
	}
	var b bytes.Buffer
	if err := json.Compact(&b, t); err != nil {
		return "", err
	}
	return b.String(), nil
}

// MarkReady sets the Node condition NetworkUnavailable=False with reason
// FlannelIsUp (a strategic merge patch of nodes/status), as upstream does
// once the network is up. It does nothing unless
// Options.SetNodeNetworkUnavailable is set. Keep calls it; embedders may
// call it again (it is idempotent apart from the heartbeat time).
func (s *Store) MarkReady(ctx context.Context) error {
	if !s.setNetUp {
		return nil
	}
	now := metav1.Now()
	patch, err := json.Marshal(map[string]any{"status": map[string]any{"conditions": []corev1.NodeCondition{{
		Type:               corev1.NodeNetworkUnavailable,
		Status:             corev1.ConditionFalse,
		Reason:             "FlannelIsUp",
		Message:            "Flannel is running on this node",
		LastTransitionTime: now,
		LastHeartbeatTime:  now,
	}}}})
	if err != nil {
		return fmt.Errorf("node %s: condition patch: %w", s.node, err)
	}
	rctx, cancel := s.reqCtx(ctx)
	defer cancel()
	if _, err := s.nodes.Patch(rctx, s.node, types.StrategicMergePatchType, patch, metav1.PatchOptions{}, "status"); err != nil {
		return fmt.Errorf("set NetworkUnavailable=False on node %s: %w", s.node, err)
	}
	return nil
}

// lookupError is a failed Get of the own Node: while Acquire waits for an
// assignment it only means "look again".
type lookupError struct {
	node string
	err  error
}

func (e *lookupError) Error() string { return fmt.Sprintf("get node %s: %v", e.node, e.err) }
func (e *lookupError) Unwrap() error { return e.err }
