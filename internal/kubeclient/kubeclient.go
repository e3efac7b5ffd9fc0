// Package kubeclient is a REST client for the two core/v1 resources the
// daemon uses, Nodes and Pods, built from client-go's rest client and a
// scheme holding only core/v1.
//
// client-go's clientset registers every API group in its scheme at init,
// whether or not a program uses them; in flanneld that cost a third of the
// process's start-up RSS. The Nodes here satisfy kubestore.NodeClient, as a
// clientset's CoreV1().Nodes() does.
package kubeclient

import (
	"context"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/rest"
)

// Client talks to the core/v1 API group. It is safe for concurrent use.
type Client struct {
	rest   rest.Interface
	params runtime.ParameterCodec
}

// New returns a client for cfg, which it does not modify. Its defaults are
// those of client-go's typed core/v1 client (path /api, protobuf unless cfg
// names a content type, the Kubernetes user agent); cfg's rate limits and
// timeouts apply.
func New(cfg *rest.Config) (*Client, error) {
	scheme := runtime.NewScheme()
	if err := corev1.AddToScheme(scheme); err != nil {
		return nil, fmt.Errorf("core/v1 scheme: %w", err)
	}
	c := rest.CopyConfig(cfg)
	gv := corev1.SchemeGroupVersion
	c.GroupVersion = &gv
	c.APIPath = "/api"
	c.NegotiatedSerializer = serializer.NewCodecFactory(scheme).WithoutConversion()
	if c.ContentType == "" {
		// Protobuf, as client-go's typed clients prefer for built-in
		// types: a list of thousands of Nodes decodes several times faster
		// than from JSON.
		c.ContentType = runtime.ContentTypeProtobuf
		c.AcceptContentTypes = runtime.ContentTypeProtobuf + "," + runtime.ContentTypeJSON
	}
	if c.UserAgent == "" {
		c.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	rc, err := rest.RESTClientFor(c)
	if err != nil {
		return nil, err
	}
	return &Client{rest: rc, params: runtime.NewParameterCodec(scheme)}, nil
}

// Pod reads a Pod.
func (c *Client) Pod(ctx context.Context, namespace, name string, opts metav1.GetOptions) (*corev1.Pod, error) {
	out := &corev1.Pod{}
	err := c.rest.Get().Namespace(namespace).Resource("pods").Name(name).
		VersionedParams(&opts, c.params).Do(ctx).Into(out)
	return out, err
}

// Nodes returns the client for Nodes.
func (c *Client) Nodes() Nodes { return Nodes{c: c} }

// Nodes reads, lists, watches and patches Nodes, with the signatures of
// client-go's typed NodeInterface.
type Nodes struct{ c *Client }

// Get reads a Node.
func (n Nodes) Get(ctx context.Context, name string, opts metav1.GetOptions) (*corev1.Node, error) {
	out := &corev1.Node{}
	err := n.c.rest.Get().Resource("nodes").Name(name).
		VersionedParams(&opts, n.c.params).Do(ctx).Into(out)
	return out, err
}

// List lists Nodes.
func (n Nodes) List(ctx context.Context, opts metav1.ListOptions) (*corev1.NodeList, error) {
	out := &corev1.NodeList{}
	err := n.c.rest.Get().Resource("nodes").
		VersionedParams(&opts, n.c.params).Timeout(timeout(opts)).Do(ctx).Into(out)
	return out, err
}

// Watch watches Nodes.
func (n Nodes) Watch(ctx context.Context, opts metav1.ListOptions) (watch.Interface, error) {
	opts.Watch = true
	return n.c.rest.Get().Resource("nodes").
		VersionedParams(&opts, n.c.params).Timeout(timeout(opts)).Watch(ctx)
}

// Patch patches a Node or, with a subresource ("status"), that part of it.
func (n Nodes) Patch(ctx context.Context, name string, pt types.PatchType, data []byte, opts metav1.PatchOptions, subresources ...string) (*corev1.Node, error) {
	out := &corev1.Node{}
	err := n.c.rest.Patch(pt).Resource("nodes").Name(name).SubResource(subresources...).
		VersionedParams(&opts, n.c.params).Body(data).Do(ctx).Into(out)
	return out, err
}

// timeout is the request timeout a list or watch asks the server for, as
// the typed clients set it (0: none).
func timeout(opts metav1.ListOptions) time.Duration {
	if opts.TimeoutSeconds == nil {
		return 0
	}
	return time.Duration(*opts.TimeoutSeconds) * time.Second
}
