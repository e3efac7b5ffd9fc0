package memstore_test

import (
	"log/slog"
	"testing"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/internal/storetest"
	"github.com/flannelkit/flannel/lease"
	"github.com/flannelkit/flannel/memstore"
)

func TestContract(t *testing.T) {
	t.Parallel()
	storetest.Run(t, storetest.Factory{New: func(t *testing.T, conf string) storetest.Cluster {
		cfg := storetest.Config(t, conf)
		return &memCluster{cfg: cfg, s: memstore.New(cfg, memstore.Options{})}
	}})
}

type memCluster struct {
	cfg lease.Config
	s   *memstore.Store
}

func (c *memCluster) Store(_ *testing.T, _ int, log *slog.Logger) flannel.LeaseStore {
	return c.s.Node(log)
}

func (c *memCluster) Write(_ *testing.T, _ string, l lease.Lease) string {
	c.s.Put(l)
	return l.Key()
}

func (c *memCluster) WriteMalformed(*testing.T, string) string { return "" }

func (c *memCluster) Delete(t *testing.T, i int) {
	id := c.cfg.Identity(storetest.Attrs(i))
	for _, l := range c.s.Leases() {
		if c.cfg.Identity(l.Attrs) == id {
			sub := l.Subnet
			if !sub.IsValid() {
				sub = l.IPv6Subnet
			}
			if !c.s.Remove(sub) {
				t.Fatalf("remove %s", l)
			}
		}
	}
}

func (c *memCluster) Caps() storetest.Caps {
	return storetest.Caps{Allocates: true, ByAddress: true, TakeOver: true}
}
