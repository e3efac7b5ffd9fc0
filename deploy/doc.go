// Package deploy holds the Kubernetes manifests (kube-flannel.yaml) and the
// Helm chart (chart/) that run flannel with the Kubernetes lease store, and
// the tests that apply them to a real kube-apiserver. It has no Go code
// beyond this comment.
package deploy
