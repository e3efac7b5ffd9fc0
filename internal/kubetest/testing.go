package kubetest

import (
	"testing"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/flannelkit/flannel/internal/testenv"
)

// NewT starts a server for the test (testenv.Require: it fails in strict
// mode when the binary is missing) and closes it in t.Cleanup. Its log is
// printed when the test fails.
func NewT(tb testing.TB, opts Options) *Server {
	tb.Helper()
	if opts.Binary == "" {
		p, ok := Binary()
		testenv.Require(tb, ok, "kube-apiserver binary at "+p+" (hack/test.sh builds it; or set "+EnvBinary+")")
		opts.Binary = p
	}
	if opts.Dir == "" {
		opts.Dir = tb.TempDir()
	}
	s, err := New(opts)
	if err != nil {
		tb.Fatalf("kubetest: %v", err)
	}
	tb.Cleanup(func() {
		if tb.Failed() {
			tb.Logf("kube-apiserver log tail:\n%s", tail(s.LogFile))
		}
		if err := s.Close(); err != nil {
			tb.Errorf("kubetest: %v", err)
		}
	})
	return s
}

// ClientT returns a clientset for config.
func ClientT(tb testing.TB, config *rest.Config) *kubernetes.Clientset {
	tb.Helper()
	cs, err := kubernetes.NewForConfig(config)
	if err != nil {
		tb.Fatalf("kubetest: client: %v", err)
	}
	return cs
}
