package netlab

import (
	"testing"

	"github.com/flannelkit/flannel/internal/testenv"
)

// NewT builds a Lab for a test: it requires root (testenv.RequireRoot),
// sweeps namespaces of dead processes' Labs (Sweep), fails the test if New
// fails, and closes the Lab in t.Cleanup, failing the
// test if Close does.
func NewT(t testing.TB, opts Options) *Lab {
	t.Helper()
	testenv.RequireRoot(t)
	// Clean up after earlier test binaries killed by their timeout.
	if removed, err := Sweep(); err != nil {
		t.Logf("netlab: %v", err)
	} else if len(removed) > 0 {
		t.Logf("netlab: removed %d namespaces of dead labs", len(removed))
	}
	l, err := New(opts)
	if err != nil {
		t.Fatalf("netlab: %v", err)
	}
	t.Cleanup(func() {
		if err := l.Close(); err != nil {
			t.Errorf("netlab: %v", err)
		}
	})
	return l
}
