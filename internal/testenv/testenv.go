// Package testenv decides what a test does when a prerequisite (root, a
// kernel feature, a binary) is missing: skip locally, fail in strict mode.
// Strict mode is FLANNEL_STRICT=1, set by the README's test command and so
// by CI, so that nothing real is skipped silently there.
package testenv

import (
	"os"
	"testing"
)

// Strict reports whether strict mode is on.
func Strict() bool { return os.Getenv("FLANNEL_STRICT") == "1" }

// Require fails (strict mode) or skips the test when ok is false, with why.
func Require(tb testing.TB, ok bool, why string) {
	tb.Helper()
	if ok {
		return
	}
	if Strict() {
		tb.Fatalf("missing prerequisite (FLANNEL_STRICT=1): %s", why)
	}
	tb.Skipf("missing prerequisite: %s (set FLANNEL_STRICT=1 to fail instead)", why)
}

// RequireRoot requires effective uid 0 (namespaces, netlink writes).
func RequireRoot(tb testing.TB) {
	tb.Helper()
	Require(tb, os.Geteuid() == 0, "tests need root (network namespaces)")
}
