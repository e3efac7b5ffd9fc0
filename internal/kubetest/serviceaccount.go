package kubetest

import (
	"context"
	"fmt"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// ServiceAccountConfig creates (if needed) the ServiceAccount namespace/name
// and its namespace, requests a token for it and returns a configuration
// authenticating as it.
func (s *Server) ServiceAccountConfig(ctx context.Context, namespace, name string) (*rest.Config, error) {
	cs, err := kubernetes.NewForConfig(s.AdminConfig())
	if err != nil {
		return nil, err
	}
	_, err = cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: namespace}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return nil, fmt.Errorf("create namespace %s: %w", namespace, err)
	}
	_, err = cs.CoreV1().ServiceAccounts(namespace).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return nil, fmt.Errorf("create service account %s/%s: %w", namespace, name, err)
	}
	exp := int64(3600)
	tr, err := cs.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, name, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{ExpirationSeconds: &exp},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("token for service account %s/%s: %w", namespace, name, err)
	}
	return s.TokenConfig(tr.Status.Token), nil
}

// PodServiceAccountConfig returns a configuration authenticating with a
// token of ServiceAccount namespace/name bound to a pod on node, as the
// kubelet gives a DaemonSet pod: the token carries the node's name
// (authentication.kubernetes.io/node-name in the user's extra) and is valid
// while the pod exists. It creates the ServiceAccount (and namespace) if
// needed and a pod object named <name>-<node> bound to node (nothing runs
// it; node need not exist).
func (s *Server) PodServiceAccountConfig(ctx context.Context, namespace, name, node string) (*rest.Config, error) {
	if _, err := s.ServiceAccountConfig(ctx, namespace, name); err != nil {
		return nil, err
	}
	cs, err := kubernetes.NewForConfig(s.AdminConfig())
	if err != nil {
		return nil, err
	}
	pod, err := cs.CoreV1().Pods(namespace).Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name + "-" + node},
		Spec: corev1.PodSpec{
			NodeName: node, ServiceAccountName: name,
			Containers: []corev1.Container{{Name: "c", Image: "registry.invalid/none"}},
		},
	}, metav1.CreateOptions{})
	if apierrors.IsAlreadyExists(err) {
		pod, err = cs.CoreV1().Pods(namespace).Get(ctx, name+"-"+node, metav1.GetOptions{})
	}
	if err != nil {
		return nil, fmt.Errorf("pod for service account %s/%s on %s: %w", namespace, name, node, err)
	}
	exp := int64(3600)
	tr, err := cs.CoreV1().ServiceAccounts(namespace).CreateToken(ctx, name, &authenticationv1.TokenRequest{
		Spec: authenticationv1.TokenRequestSpec{
			ExpirationSeconds: &exp,
			BoundObjectRef:    &authenticationv1.BoundObjectReference{APIVersion: "v1", Kind: "Pod", Name: pod.Name, UID: pod.UID},
		},
	}, metav1.CreateOptions{})
	if err != nil {
		return nil, fmt.Errorf("pod-bound token for service account %s/%s on %s: %w", namespace, name, node, err)
	}
	return s.TokenConfig(tr.Status.Token), nil
}
