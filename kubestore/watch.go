package kubestore

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/go-logr/logr"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/tools/cache"

	"github.com/flannelkit/flannel/lease"
)

// Watch calls fn with the leases of every flannel node (Nodes with
// <prefix>/kube-subnet-manager=true and a podCIDR; this node included)
// until ctx ends, and then returns nil after joining its informer.
//
// It runs an informer over Nodes whose cache holds each Node stripped to
// its name, podCIDR(s) and the flannel annotations (a transform drops
// status, labels and the rest before anything is stored). The first
// snapshot comes once the informer has synced; later ones after each change
// (a node added, deleted, a podCIDR, public IP or backend data of either
// family changed). After a relist (the watch broke: apiserver restart,
// expired resource version) the next snapshot has Resync set; snapshots are
// always complete, so nothing is missed. A node whose annotations are
// malformed is skipped with a warning naming it. fn is called from Watch's
// goroutine only.
func (s *Store) Watch(ctx context.Context, fn func(lease.Snapshot)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	var lists atomic.Int64 // bumped by every (re)list, for Resync
	lw := &cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			lists.Add(1)
			return s.nodes.List(ctx, o)
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			if o.SendInitialEvents != nil && *o.SendInitialEvents {
				lists.Add(1) // a streaming list
			}
			return s.nodes.Watch(ctx, o)
		},
	}
	kick := make(chan struct{}, 1)
	notify := func() {
		select {
		case kick <- struct{}{}:
		default:
		}
	}
	// client-go logs through logr; route it to the store's logger instead
	// of klog's stderr.
	lg := logr.FromSlogHandler(s.log.With("node", s.node, "informer", "nodes").Handler())
	store, ctrl := cache.NewInformerWithOptions(cache.InformerOptions{
		Logger:        &lg,
		ListerWatcher: lw,
		ObjectType:    &corev1.Node{},
		Transform:     s.strip,
		Handler: cache.ResourceEventHandlerFuncs{
			AddFunc:    func(any) { notify() },
			UpdateFunc: func(any, any) { notify() },
			DeleteFunc: func(any) { notify() },
		},
	})
	var wg sync.WaitGroup
	wg.Go(func() { ctrl.RunWithContext(ctx) })
	defer wg.Wait()
	defer cancel()

	if !cache.WaitForCacheSync(ctx.Done(), ctrl.HasSynced) {
		return nil
	}
	var (
		last     []lease.Lease
		seenList int64
		first    = true
	)
	for {
		gen := lists.Load()
		leases := s.leases(store.List(), &s.warn)
		resync := first || gen != seenList
		if resync || !slices.EqualFunc(last, leases, leaseEqual) {
			fn(lease.Snapshot{Leases: leases, Resync: resync})
			last, seenList, first = leases, gen, false
		}
		select {
		case <-ctx.Done():
			return nil
		case <-kick:
		}
	}
}

// leases converts the cached nodes and returns the valid ones
// (lease.Config.Peers), sorted by name. Malformed and ignored nodes are
// warned about once per change to their value.
//
// The rule's subnet length is the length of this Node's podCIDR (the
// controller manager's --node-cidr-mask-size, which Kubernetes applies to
// every Node alike), or SubnetLen (IPv6SubnetLen) while this Node has
// none. Of two Nodes with one podCIDR, the one created earlier wins
// (creationTimestamp has whole seconds: two created in the same second
// are both ignored); another Node never takes this Node's podCIDR.
func (s *Store) leases(objs []any, warn *lease.Warnings) []lease.Lease {
	nodes := make([]*peerNode, 0, len(objs))
	for _, o := range objs {
		if n, ok := o.(*peerNode); ok {
			nodes = append(nodes, n)
		}
	}
	slices.SortFunc(nodes, func(a, b *peerNode) int { return strings.Compare(a.Name, b.Name) })
	cands := make([]lease.Candidate, 0, len(nodes))
	var malformed []lease.Ignored
	cfg := s.cfg
	var own lease.Lease // this Node's: PeerLeases puts it first (no copy in the Agent)
	for _, n := range nodes {
		l, err := s.nodeLease(n.fields(), false)
		c := lease.Candidate{Name: n.Name, Lease: l, Order: n.CreationTimestamp.Unix(), Own: n.Name == s.node}
		switch {
		case errors.Is(err, errNotPeer):
		case err != nil:
			malformed = append(malformed, lease.Ignored{Candidate: c, Rule: lease.RuleMalformed, Detail: err.Error()})
		default:
			cands = append(cands, c)
			if c.Own {
				cfg, own = peerLengths(cfg, l), l
			}
		}
	}
	leases, ignored := cfg.PeerLeases(cands, own)
	for _, ig := range warn.Fresh(append(slices.Clip(ignored), malformed...)) {
		if ig.Rule == lease.RuleMalformed {
			s.log.Warn("skipping node with malformed flannel data", "node", ig.Name, "error", ig.Detail)
		} else {
			s.log.Warn("ignoring lease", "node", ig.Name, "rule", string(ig.Rule), "reason", ig.Detail)
		}
	}
	return leases
}

// peerLengths returns cfg with the subnet lengths of own's podCIDRs.
func peerLengths(cfg lease.Config, own lease.Lease) lease.Config {
	if own.Subnet.IsValid() {
		cfg.SubnetLen = own.Subnet.Bits()
	}
	if own.IPv6Subnet.IsValid() {
		cfg.IPv6SubnetLen = own.IPv6Subnet.Bits()
	}
	return cfg
}

func leaseEqual(a, b lease.Lease) bool {
	return a.SameSubnets(b) && a.Attrs.Equal(b.Attrs)
}

// peerNode is what the informer's cache keeps of a Node: the metadata
// the cache and nodeLease read (name, UID, resourceVersion,
// creationTimestamp, the flannel annotations) and the podCIDRs, at a
// third of a *corev1.Node's size (whose status is inline) for every Node
// of the cluster. The embedded ObjectMeta makes it a metav1.Object, which
// is all the cache's key function and the informer need.
type peerNode struct {
	metav1.ObjectMeta
	podCIDR  string
	podCIDRs []string
}

func (n *peerNode) fields() nodeFields {
	return nodeFields{name: n.Name, annotations: n.Annotations, podCIDR: n.podCIDR, podCIDRs: n.podCIDRs}
}

// strip is the informer's transform: it keeps only what nodeLease reads, so
// that the cache does not hold node status (images, conditions, addresses).
func (s *Store) strip(obj any) (any, error) {
	n, ok := obj.(*corev1.Node)
	if !ok {
		return obj, nil // a tombstone, or a peerNode already
	}
	out := &peerNode{
		ObjectMeta: metav1.ObjectMeta{
			Name:              n.Name,
			UID:               n.UID,
			ResourceVersion:   n.ResourceVersion,
			CreationTimestamp: n.CreationTimestamp,
		},
		podCIDR: n.Spec.PodCIDR, podCIDRs: n.Spec.PodCIDRs,
	}
	for k, v := range n.Annotations {
		if s.ann.ours(k) {
			if out.Annotations == nil {
				out.Annotations = map[string]string{}
			}
			out.Annotations[k] = v
		}
	}
	return out, nil
}
