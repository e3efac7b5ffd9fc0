package etcdtest

import (
	"context"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

func TestServer(t *testing.T) {
	tests := []struct {
		name string
		opts Options
	}{
		{name: "plain"},
		{name: "tls", opts: Options{TLS: true}},
		{name: "client certs and auth", opts: Options{ClientCertAuth: true, RootPassword: "s3cret"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := NewT(t, tt.opts)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			c := ClientT(t, s)
			_, err := c.Put(ctx, "/k", "v")
			require.NoError(t, err)

			s.Stop()
			assert.False(t, s.Running())
			short, cancelShort := context.WithTimeout(ctx, 500*time.Millisecond)
			_, err = c.Get(short, "/k")
			cancelShort()
			require.Error(t, err, "get from a stopped server")

			require.NoError(t, s.Start())
			resp, err := c.Get(ctx, "/k")
			require.NoError(t, err, "same client after restart")
			require.Len(t, resp.Kvs, 1)
			assert.Equal(t, "v", string(resp.Kvs[0].Value))
		})
	}
}
