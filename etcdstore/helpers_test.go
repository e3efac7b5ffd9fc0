package etcdstore_test

import (
	"fmt"
	"net/netip"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/goleak"

	"github.com/flannelkit/flannel/etcdstore"
	"github.com/flannelkit/flannel/internal/etcdtest"
	"github.com/flannelkit/flannel/lease"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

const netConf = `{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}`

// env is one test's etcd server, an admin client, and a key prefix.
type env struct {
	srv    *etcdtest.Server
	admin  *clientv3.Client
	prefix string
}

func newEnv(t *testing.T, opts etcdtest.Options) *env {
	t.Helper()
	srv := etcdtest.NewT(t, opts)
	return &env{srv: srv, admin: etcdtest.ClientT(t, srv), prefix: "/test/" + strings.ReplaceAll(t.Name(), "/", "_")}
}

// client returns a new client of the (plain) server made by NewClient,
// closed at cleanup.
func (e *env) client(t *testing.T) *clientv3.Client {
	t.Helper()
	c, err := etcdstore.NewClient(etcdstore.ClientOptions{Endpoints: e.srv.Endpoints})
	require.NoError(t, err)
	t.Cleanup(func() { c.Close() })
	return c
}

// store returns a store on c (a new client when nil) under e.prefix.
func (e *env) store(t *testing.T, c *clientv3.Client, opts etcdstore.Options) *etcdstore.Store {
	t.Helper()
	if c == nil {
		c = e.client(t)
	}
	if opts.Prefix == "" {
		opts.Prefix = e.prefix
	}
	if opts.RetryMax == 0 {
		opts.RetryMin, opts.RetryMax = 50*time.Millisecond, 500*time.Millisecond
	}
	s, err := etcdstore.New(c, opts)
	require.NoError(t, err)
	return s
}

func (e *env) putConfig(t *testing.T, conf string) {
	t.Helper()
	s := e.store(t, e.admin, etcdstore.Options{})
	require.NoError(t, s.PutConfig(t.Context(), []byte(conf)))
}

func (e *env) get(t *testing.T, key string) (*clientKV, bool) {
	t.Helper()
	resp, err := e.admin.Get(t.Context(), key)
	require.NoError(t, err)
	if len(resp.Kvs) == 0 {
		return nil, false
	}
	kv := resp.Kvs[0]
	return &clientKV{Value: string(kv.Value), Lease: kv.Lease, ModRevision: kv.ModRevision}, true
}

type clientKV struct {
	Value       string
	Lease       int64
	ModRevision int64
}

func (e *env) subnetKeys(t *testing.T) []string {
	t.Helper()
	resp, err := e.admin.Get(t.Context(), e.prefix+"/subnets/", clientv3.WithPrefix(), clientv3.WithKeysOnly())
	require.NoError(t, err)
	var out []string
	for _, kv := range resp.Kvs {
		out = append(out, strings.TrimPrefix(string(kv.Key), e.prefix+"/subnets/"))
	}
	return out
}

func nodeIP(i int) netip.Addr {
	return netip.AddrFrom4([4]byte{192, 168, byte(i / 250), byte(i%250 + 1)})
}

func attrs(i int) lease.Attrs {
	return lease.Attrs{
		PublicIP:    nodeIP(i),
		BackendType: "vxlan",
		BackendData: []byte(fmt.Sprintf(`{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:%02x"}`, i%256)),
	}
}
