package main

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/flannelkit/flannel/etcdstore"
	"github.com/flannelkit/flannel/internal/etcdtest"
	"github.com/flannelkit/flannel/internal/kubetest"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/kubestore"
)

const benchNetConf = `{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{"Type":"vxlan"}}`

// etcdValue is a peer's lease value as upstream writes it.
func etcdValue(p peer) string {
	return fmt.Sprintf(`{"PublicIP":"%s","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"%s"}}`, p.public, p.mac)
}

func etcdKey(p netip.Prefix) string {
	return etcdstore.DefaultPrefix + "/subnets/" + strings.Replace(p.String(), "/", "-", 1)
}

// etcdSetup starts an embedded etcd holding the network config and
// o.peers synthetic leases (one etcd lease of a day, as upstream's TTL).
func etcdSetup(ctx context.Context, o options) (*storeSetup, error) {
	srv, err := etcdtest.New(etcdtest.Options{})
	if err != nil {
		return nil, err
	}
	c, err := srv.Client()
	if err != nil {
		srv.Close()
		return nil, err
	}
	closeAll := func() { c.Close(); srv.Close() }
	grant, err := c.Grant(ctx, int64((24 * time.Hour).Seconds()))
	if err != nil {
		closeAll()
		return nil, err
	}
	if _, err := c.Put(ctx, etcdstore.DefaultPrefix+"/config", benchNetConf); err != nil {
		closeAll()
		return nil, err
	}
	ps := synthetic(o.peers + o.joins)
	var ops []clientv3.Op
	flush := func() error {
		if len(ops) == 0 {
			return nil
		}
		_, err := c.Txn(ctx).Then(ops...).Commit()
		ops = ops[:0]
		return err
	}
	for _, p := range ps[:o.peers] {
		ops = append(ops, clientv3.OpPut(etcdKey(p.subnet), etcdValue(p), clientv3.WithLease(grant.ID)))
		if len(ops) == 100 {
			if err := flush(); err != nil {
				closeAll()
				return nil, err
			}
		}
	}
	if err := flush(); err != nil {
		closeAll()
		return nil, err
	}
	host, err := hostOf(srv.Endpoints[0])
	if err != nil {
		closeAll()
		return nil, err
	}
	const port = 2379
	return &storeSetup{
		target: host, port: port, peers: o.peers, close: closeAll,
		args: []string{fmt.Sprintf("--etcd-endpoints=http://%s", netip.AddrPortFrom(netlab.RouterIP(0), port))},
		put: func(ctx context.Context, k int) (netip.Prefix, error) {
			// Only free subnets join: the daemon's own random one may be
			// among the synthetic peers', and overwriting it would take
			// its lease away.
			p, key := ps[k], etcdKey(ps[k].subnet)
			txn, err := c.Txn(ctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
				Then(clientv3.OpPut(key, etcdValue(p), clientv3.WithLease(grant.ID))).Commit()
			if err == nil && !txn.Succeeded {
				err = errTaken
			}
			return p.subnet, err
		},
	}, nil
}

// errTaken: the join's subnet is held already (by the daemon); it is
// skipped.
var errTaken = errors.New("subnet taken")

// kubeSetup starts a kube-apiserver holding o.peers realistic Nodes
// (kubetest.CreateRealisticNodes) and the daemon's own Node, and writes
// the daemon's kubeconfig and net-conf.json into dir.
func kubeSetup(ctx context.Context, o options, dir string) (*storeSetup, error) {
	srv, err := kubetest.New(kubetest.Options{})
	if err != nil {
		return nil, err
	}
	fail := func(err error) (*storeSetup, error) { srv.Close(); return nil, err }
	cfg := srv.AdminConfig()
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	cfg.QPS, cfg.Burst = 1000, 1000
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fail(err)
	}
	t0 := time.Now()
	if err := kubetest.CreateRealisticNodes(ctx, cs, o.peers, kubestore.DefaultAnnotationPrefix); err != nil {
		return fail(err)
	}
	fmt.Fprintf(os.Stderr, "bench: created %d Nodes in %s\n", o.peers, time.Since(t0).Round(time.Millisecond))
	const self = "bench-node"
	own := "10.255.255.0/24"
	if _, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{
		ObjectMeta: metav1.ObjectMeta{Name: self},
		Spec:       corev1.NodeSpec{PodCIDR: own, PodCIDRs: []string{own}},
	}, metav1.CreateOptions{}); err != nil {
		return fail(err)
	}
	host, err := hostOf(srv.URL)
	if err != nil {
		return fail(err)
	}
	const port = 6443
	// The certificate names 127.0.0.1 and localhost; the daemon dials the
	// router's address and verifies the name localhost.
	kubeconfig := filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(kubeconfig, fmt.Appendf(nil, `apiVersion: v1
kind: Config
clusters:
- name: bench
  cluster:
    server: https://%s
    certificate-authority: %s
    tls-server-name: localhost
users:
- name: bench
  user:
    token: %s
contexts:
- name: bench
  context:
    cluster: bench
    user: bench
current-context: bench
`, netip.AddrPortFrom(netlab.RouterIP(0), port), srv.CAFile, srv.AdminToken()), 0o600); err != nil {
		return fail(err)
	}
	netConf := filepath.Join(dir, "net-conf.json")
	if err := os.WriteFile(netConf, []byte(benchNetConf), 0o644); err != nil {
		return fail(err)
	}
	return &storeSetup{
		target: host, port: port, peers: o.peers, close: func() { srv.Close() },
		args: []string{"--kube-subnet-mgr", "--kubeconfig-file=" + kubeconfig, "--net-config-path=" + netConf},
		env:  []string{"NODE_NAME=" + self},
		put: func(context.Context, int) (netip.Prefix, error) {
			return netip.Prefix{}, fmt.Errorf("-scenario join: -store etcd only")
		},
	}, nil
}
