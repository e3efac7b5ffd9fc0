// Package testenv decides what a test does when a prerequisite (root, a
// kernel feature, a binary) is missing: skip locally, fail in strict mode.
// Strict mode is FLANNEL_STRICT=1, set by the README's test command and so
// by CI, so that nothing real is skipped silently there.
package testenv

import (
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
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

// Tool returns the path of a tool hack/test.sh builds from the tools
// modules into .cache/bin at the root of this repository, or $env when
// set, and whether it exists.
func Tool(name, env string) (string, bool) {
	if p := os.Getenv(env); p != "" {
		_, err := os.Stat(p)
		return p, err == nil
	}
	root, err := RepoRoot()
	if err != nil {
		return name, false
	}
	p := filepath.Join(root, ".cache", "bin", name)
	_, err = os.Stat(p)
	return p, err == nil
}

// RepoRoot walks up from the working directory to the go.mod of module
// github.com/flannelkit/flannel.
func RepoRoot() (string, error) {
	dir, err := os.Getwd()
	if err != nil {
		return "", err
	}
	for {
		b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
		if err == nil && strings.HasPrefix(string(b), "module github.com/flannelkit/flannel\n") {
			return dir, nil
		}
		parent := filepath.Dir(dir)
		if parent == dir {
			return "", errors.New("repository root not found above the working directory")
		}
		dir = parent
	}
}

// GoBinary is the go command that builds helper binaries: the one on PATH
// (go test puts its own GOROOT/bin first, and hack/test.sh puts
// /usr/local/go/bin there), else plain "go".
func GoBinary() string {
	if p, err := exec.LookPath("go"); err == nil {
		return p
	}
	return "go"
}
