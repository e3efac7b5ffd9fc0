//go:build tools

// Package tools pins the commands the tests build (see hack/test.sh).
package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
)
