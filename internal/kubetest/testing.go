package kubetest

import (
	"testing"

	"go.uber.org/goleak"
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

// LeakOptions are the goroutines goleak must ignore in a package that uses
// client-go: klog's flush daemon (started by client-go's init, once per
// process) and the idle keep-alive connections of its shared transports.
func LeakOptions() []goleak.Option {
	return []goleak.Option{
		goleak.IgnoreTopFunction("k8s.io/klog/v2.(*flushDaemon).run.func1"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).readLoop"),
		goleak.IgnoreTopFunction("net/http.(*persistConn).writeLoop"),
		goleak.IgnoreTopFunction("internal/poll.runtime_pollWait"),
	}
}
