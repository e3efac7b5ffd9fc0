package kubetest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"
)

// ApplyOptions configure Apply.
type ApplyOptions struct {
	// DryRun sends every object as a server-side dry run: fully validated
	// and admitted, never stored.
	DryRun bool
}

// Apply server-side-applies every object of a multi-document YAML (or JSON)
// stream, in order, as kubectl apply --server-side would, and returns them
// as the server answered. Namespaced objects without a namespace go to
// "default". The error names the object that failed.
func Apply(ctx context.Context, config *rest.Config, manifests []byte, opts ApplyOptions) ([]*unstructured.Unstructured, error) {
	dc, err := discovery.NewDiscoveryClientForConfig(config)
	if err != nil {
		return nil, err
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))
	dyn, err := dynamic.NewForConfig(config)
	if err != nil {
		return nil, err
	}
	objs, err := Decode(manifests)
	if err != nil {
		return nil, err
	}
	var out []*unstructured.Unstructured
	for _, obj := range objs {
		gvk := obj.GroupVersionKind()
		name := fmt.Sprintf("%s %s", gvk.Kind, obj.GetName())
		m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			return out, fmt.Errorf("%s: %w", name, err)
		}
		var ri dynamic.ResourceInterface = dyn.Resource(m.Resource)
		if m.Scope.Name() == meta.RESTScopeNameNamespace {
			if obj.GetNamespace() == "" {
				obj.SetNamespace("default")
			}
			ri = dyn.Resource(m.Resource).Namespace(obj.GetNamespace())
		}
		ao := metav1.ApplyOptions{FieldManager: "kubetest", Force: true}
		if opts.DryRun {
			ao.DryRun = []string{metav1.DryRunAll}
		}
		got, err := ri.Apply(ctx, obj.GetName(), obj, ao)
		if err != nil {
			return out, fmt.Errorf("apply %s: %w", name, err)
		}
		out = append(out, got)
	}
	return out, nil
}

// Decode parses a multi-document YAML (or JSON) stream into objects, as
// Apply reads it, without a server.
func Decode(manifests []byte) ([]*unstructured.Unstructured, error) {
	dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(manifests), 4096)
	var out []*unstructured.Unstructured
	for {
		var obj unstructured.Unstructured
		if err := dec.Decode(&obj.Object); err != nil {
			if errors.Is(err, io.EOF) {
				return out, nil
			}
			return out, fmt.Errorf("decode manifest: %w", err)
		}
		if len(obj.Object) > 0 {
			out = append(out, &obj)
		}
	}
}
