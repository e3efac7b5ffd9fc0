package etcdtest

import (
	"testing"

	clientv3 "go.etcd.io/etcd/client/v3"
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
