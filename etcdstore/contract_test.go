package etcdstore_test

import (
	"encoding/json"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/etcdstore"
	"github.com/flannelkit/flannel/internal/etcdtest"
	"github.com/flannelkit/flannel/internal/storetest"
	"github.com/flannelkit/flannel/lease"
)

func TestContract(t *testing.T) {
	t.Parallel()
	storetest.Run(t, storetest.Factory{New: func(t *testing.T, conf string) storetest.Cluster {
		// A server per cluster: Gap restarts it.
		srv := etcdtest.NewT(t, etcdtest.Options{})
		c := &etcdCluster{srv: srv, admin: etcdtest.ClientT(t, srv), cfg: storetest.Config(t, conf),
			prefix: "/contract/" + strings.ReplaceAll(t.Name(), "/", "_")}
		s := c.Store(t, 0, nil).(*etcdstore.Store)
		require.NoError(t, s.PutConfig(t.Context(), []byte(conf)))
		return c
	}})
}

type etcdCluster struct {
	srv    *etcdtest.Server
	admin  *clientv3.Client
	cfg    lease.Config
	prefix string
}

func (c *etcdCluster) Store(t *testing.T, _ int, log *slog.Logger) flannel.LeaseStore {
	cl, err := etcdstore.NewClient(etcdstore.ClientOptions{Endpoints: c.srv.Endpoints})
	require.NoError(t, err)
	t.Cleanup(func() { cl.Close() })
	s, err := etcdstore.New(cl, etcdstore.Options{Prefix: c.prefix, Logger: log,
		RetryMin: 50 * time.Millisecond, RetryMax: 500 * time.Millisecond})
	require.NoError(t, err)
	return s
}

func (c *etcdCluster) Write(t *testing.T, _ string, l lease.Lease) string {
	v, err := json.Marshal(l.Attrs)
	require.NoError(t, err)
	key := c.prefix + "/subnets/" + l.Key()
	_, err = c.admin.Put(t.Context(), key, string(v))
	require.NoError(t, err)
	return key
}

func (c *etcdCluster) WriteMalformed(t *testing.T, _ string) string {
	key := c.prefix + "/subnets/" + storetest.Subnet(c.cfg, 30).Addr().String() + "-24"
	_, err := c.admin.Put(t.Context(), key, `{"PublicIP":"not an address"`)
	require.NoError(t, err)
	return key
}

func (c *etcdCluster) Delete(t *testing.T, i int) {
	resp, err := c.admin.Get(t.Context(), c.prefix+"/subnets/", clientv3.WithPrefix())
	require.NoError(t, err)
	for _, kv := range resp.Kvs {
		var a lease.Attrs
		if json.Unmarshal(kv.Value, &a) == nil && c.cfg.SameNode(a, storetest.Attrs(i)) {
			_, err := c.admin.Delete(t.Context(), string(kv.Key))
			require.NoError(t, err)
		}
	}
}

func (c *etcdCluster) Caps() storetest.Caps {
	return storetest.Caps{Allocates: true, ByAddress: true, TakeOver: true, Gap: func(t *testing.T) {
		require.NoError(t, c.srv.Restart())
	}}
}

// Grant returns the etcd lease of node i's key.
func (c *etcdCluster) Grant(t *testing.T, i int) int64 {
	resp, err := c.admin.Get(t.Context(), c.prefix+"/subnets/", clientv3.WithPrefix())
	require.NoError(t, err)
	for _, kv := range resp.Kvs {
		var a lease.Attrs
		if json.Unmarshal(kv.Value, &a) == nil && c.cfg.SameNode(a, storetest.Attrs(i)) {
			return kv.Lease
		}
	}
	t.Fatalf("no key of node %d", i)
	return 0
}

// Revoked reports whether an etcd lease is gone.
func (c *etcdCluster) Revoked(t *testing.T, grant int64) bool {
	ttl, err := c.admin.TimeToLive(t.Context(), clientv3.LeaseID(grant))
	require.NoError(t, err)
	return ttl.TTL == -1
}
