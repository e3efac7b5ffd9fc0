//go:build tools

// Package tools pins the Helm CLI (see hack/test.sh).
package tools

import (
	_ "helm.sh/helm/v3/cmd/helm"
)
