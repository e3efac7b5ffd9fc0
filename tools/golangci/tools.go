//go:build tools

// Package tools pins golangci-lint (see hack/test.sh and .golangci.yml).
package tools

import (
	_ "github.com/golangci/golangci-lint/v2/cmd/golangci-lint"
)
