//go:build tools

// Package tools pins CoreDNS (see hack/test.sh).
package tools

import (
	_ "github.com/coredns/coredns"
)
