// Package kubestore is a flannel.LeaseStore backed by the Kubernetes API, the
// store K3s-style distributions use: a node's subnets are its Node's
// spec.podCIDR(s), assigned by the controller manager (flannel never picks
// them), and what a node publishes about itself lives in annotations on its
// Node, wire-compatible with upstream flannel (<prefix>/backend-type,
// backend-data, backend-v6-data, public-ip, public-ipv6,
// kube-subnet-manager; see shared compat/FORMATS.md).
//
// The caller owns the client (kubeconfig, in-cluster config, rate limits)
// and passes the node name and the network configuration (lease.ParseConfig
// of net-conf.json): the store reads no environment variable and no file.
// Kubernetes leases do not expire: Keep only watches the own Node. Watch
// keeps an informer whose cache holds Nodes stripped to what the store needs,
// so memory does not grow with the size of node status.
//
// It is not a controller: it never assigns podCIDRs and never deletes Nodes.
package kubestore

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/validation"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
)

// Defaults for Options.
const (
	DefaultAnnotationPrefix = "flannel.alpha.coreos.com"
	DefaultPollInterval     = time.Second
	DefaultRetryMin         = 200 * time.Millisecond
	DefaultRetryMax         = 30 * time.Second
	DefaultRequestTimeout   = 30 * time.Second
)

// Options configure a Store.
type Options struct {
	// NodeName is the name of this node's Node object. Required.
	NodeName string
	// Config is the cluster network configuration, typically
	// lease.ParseConfig of the net-conf.json file of a ConfigMap. Required
	// (it must be valid).
	Config lease.Config
	// AnnotationPrefix prefixes the annotation keys. Default
	// DefaultAnnotationPrefix. Upstream's rules apply: at most one "/";
	// without one, "/" is appended; a prefix not ending in "/" or "-" gets
	// a "-" (so "example.com/net" gives "example.com/net-public-ip"); every
	// resulting key must be a valid annotation key.
	AnnotationPrefix string
	// SetNodeNetworkUnavailable makes Keep (which runs once the node's
	// network is up) and MarkReady set the Node condition
	// NetworkUnavailable=False with reason FlannelIsUp. Optional.
	SetNodeNetworkUnavailable bool
	// PollInterval is how often Acquire looks again at a Node that does not
	// exist or has no podCIDR yet. Default DefaultPollInterval.
	PollInterval time.Duration
	// RetryMin and RetryMax bound the capped, jittered exponential backoff
	// of Keep after a failure. Defaults DefaultRetryMin, DefaultRetryMax.
	RetryMin, RetryMax time.Duration
	// RequestTimeout bounds each API request. Default DefaultRequestTimeout.
	RequestTimeout time.Duration
	// Logger receives the store's logs. nil discards.
	Logger *slog.Logger
}

// NodeClient is the part of client-go's typed Node client the store uses:
// a clientset's CoreV1().Nodes() is one. Its calls must honour ctx.
type NodeClient interface {
	Get(ctx context.Context, name string, opts metav1.GetOptions) (*corev1.Node, error)
	List(ctx context.Context, opts metav1.ListOptions) (*corev1.NodeList, error)
	Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error)
	Patch(ctx context.Context, name string, pt types.PatchType, data []byte, opts metav1.PatchOptions, subresources ...string) (*corev1.Node, error)
}

// Store is a Kubernetes lease store. It is safe for concurrent use.
type Store struct {
	nodes      NodeClient
	node       string
	cfg        lease.Config
	ann        annotations
	setNetUp   bool
	poll       time.Duration
	retryMin   time.Duration
	retryMax   time.Duration
	reqTimeout time.Duration
	log        *slog.Logger
	warn       lease.Warnings // shared by every Watch of the store
}

var _ flannel.LeaseStore = (*Store)(nil)

// New returns a store reading and patching Nodes through nodes (for
// example clientset.CoreV1().Nodes()), which the caller keeps owning. The
// error names the invalid option.
func New(nodes NodeClient, opts Options) (*Store, error) {
	if nodes == nil {
		return nil, errors.New("kube store: a Node client is required")
	}
	if opts.NodeName == "" {
		return nil, errors.New("kube store: NodeName is required")
	}
	if err := opts.Config.Validate(); err != nil {
		return nil, fmt.Errorf("kube store: %w", err)
	}
	prefix := opts.AnnotationPrefix
	if prefix == "" {
		prefix = DefaultAnnotationPrefix
	}
	ann, err := newAnnotations(prefix)
	if err != nil {
		return nil, fmt.Errorf("kube store: %w", err)
	}
	s := &Store{
		nodes:      nodes,
		node:       opts.NodeName,
		cfg:        opts.Config,
		ann:        ann,
		setNetUp:   opts.SetNodeNetworkUnavailable,
		poll:       opts.PollInterval,
		retryMin:   opts.RetryMin,
		retryMax:   opts.RetryMax,
		reqTimeout: opts.RequestTimeout,
		log:        opts.Logger,
	}
	if s.poll <= 0 {
		s.poll = DefaultPollInterval
	}
	if s.retryMin <= 0 {
		s.retryMin = DefaultRetryMin
	}
	if s.retryMax <= 0 {
		s.retryMax = DefaultRetryMax
	}
	if s.retryMax < s.retryMin {
		return nil, fmt.Errorf("kube store: RetryMax %s is below RetryMin %s", s.retryMax, s.retryMin)
	}
	if s.reqTimeout <= 0 {
		s.reqTimeout = DefaultRequestTimeout
	}
	if s.log == nil {
		s.log = slog.New(slog.DiscardHandler)
	}
	return s, nil
}

// Config returns the network configuration passed in Options.
func (s *Store) Config(context.Context) (lease.Config, error) { return s.cfg, nil }

// NodeName returns the name of this node's Node object.
func (s *Store) NodeName() string { return s.node }

// reqCtx bounds one API request.
func (s *Store) reqCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(ctx, s.reqTimeout)
}

// annotations are the full annotation keys for one prefix.
type annotations struct {
	prefix             string
	subnetKubeManaged  string
	backendType        string
	backendData        string
	backendV6Data      string
	publicIP           string
	publicIPv6         string
	publicIPOverwrite  string
	publicIPv6Overwite string
	nodePublicIP       string
	nodePublicIPv6     string
}

// newAnnotations applies upstream flannel's prefix rules and checks every
// resulting key.
func newAnnotations(prefix string) (annotations, error) {
	orig := prefix
	switch strings.Count(prefix, "/") {
	case 0:
		prefix += "/"
	case 1:
	default:
		return annotations{}, fmt.Errorf("annotation prefix %q: at most one \"/\" is allowed", orig)
	}
	if !strings.HasSuffix(prefix, "/") && !strings.HasSuffix(prefix, "-") {
		prefix += "-"
	}
	a := annotations{
		prefix:             prefix,
		subnetKubeManaged:  prefix + "kube-subnet-manager",
		backendType:        prefix + "backend-type",
		backendData:        prefix + "backend-data",
		backendV6Data:      prefix + "backend-v6-data",
		publicIP:           prefix + "public-ip",
		publicIPv6:         prefix + "public-ipv6",
		publicIPOverwrite:  prefix + "public-ip-overwrite",
		publicIPv6Overwite: prefix + "public-ipv6-overwrite",
		nodePublicIP:       prefix + "node-public-ip",
		nodePublicIPv6:     prefix + "node-public-ipv6",
	}
	for _, k := range []string{a.subnetKubeManaged, a.publicIPv6Overwite} {
		if errs := validation.IsQualifiedName(k); len(errs) > 0 {
			return annotations{}, fmt.Errorf("annotation prefix %q gives invalid annotation key %q: %s", orig, k, strings.Join(errs, "; "))
		}
	}
	return a, nil
}

// ours reports whether an annotation key is one the store reads or writes.
func (a annotations) ours(key string) bool {
	return strings.HasPrefix(key, a.prefix)
}
