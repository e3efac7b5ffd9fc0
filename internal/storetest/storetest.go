// Package storetest is the contract suite of flannel.LeaseStore (written
// in flannel.go) and the shared test helpers of the stores: Run checks
// Acquire, Keep, Watch, the valid-peer rule (lease.Config.Peers) and how a
// node is identified, once, against every store on its real server
// (memstore, etcdstore on internal/etcdtest, kubestore on
// internal/kubetest); Watcher records a store's snapshots.
//
// It is test support: it calls t.Fatal, and is not for production code.
package storetest

import (
	"fmt"
	"log/slog"
	"net/netip"
	"strings"
	"testing"

	"github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/lease"
)

// Factory is what a store gives the suite.
type Factory struct {
	// New returns an empty instance of the store holding the network
	// netConf (net-conf.json), cleaned up with t. Required.
	New func(t *testing.T, netConf string) Cluster
	// Sequential makes the suite run its subtests one after another (a
	// store whose instances share one server that New resets).
	Sequential bool
}

// Cluster is one instance of a store, seen by several nodes.
type Cluster interface {
	// Store returns the store node i uses (publishing Attrs(i)), logging
	// to log. Calling it again for the same i gives another store of the
	// same node (a restart). For a store that assigns subnets itself
	// (Kubernetes), node i is assigned Subnet(i) of the network.
	Store(t *testing.T, i int, log *slog.Logger) flannel.LeaseStore
	// Write writes l as another writer would (a buggy tool, a hostile
	// client), without any check, and returns what the store's warnings
	// name it by (an etcd key, a Node name). name is a DNS label the
	// store may use (the Kubernetes Node name).
	Write(t *testing.T, name string, l lease.Lease) string
	// WriteMalformed writes data that does not parse as a lease and
	// returns what warnings name it by; "" when the store cannot hold
	// such data (memstore keeps typed leases).
	WriteMalformed(t *testing.T, name string) string
	// Delete deletes node i's lease as if the node had vanished.
	Delete(t *testing.T, i int)
	// Caps says which parts of the contract apply.
	Caps() Caps
}

// Caps are the differences between stores the contract allows.
type Caps struct {
	// Allocates: the store picks subnets (Request.Previous, exhaustion
	// with lease.ErrNoFreeSubnet). The Kubernetes store does not: the
	// controller manager assigns podCIDRs.
	Allocates bool
	// Unassigned returns a store for a node that has no subnet assigned
	// yet, whose Acquire returns lease.ErrNotAssigned when its context
	// ends; nil when the store cannot return that error (memory, etcd).
	Unassigned func(t *testing.T) flannel.LeaseStore
	// ByAddress: nodes are identified by lease.Config.Identity (memory,
	// etcd); otherwise by name (Kubernetes: the Node).
	ByAddress bool
	// TakeOver: Write of another node's attributes over a lease replaces
	// it (one key per subnet: memory, etcd).
	TakeOver bool
	// Gap breaks every watch of the cluster (restarts its server) and
	// returns once the server serves again; nil when the store has no
	// gaps (memory).
	Gap func(t *testing.T)
}

// Attrs returns what node i publishes: PublicIP 192.0.2.(10+i),
// PublicIPv6 2001:db8::(10+i), vxlan backend data with a MAC of i.
func Attrs(i int) lease.Attrs {
	return lease.Attrs{
		PublicIP:      netip.AddrFrom4([4]byte{192, 0, 2, byte(10 + i)}),
		PublicIPv6:    netip.MustParseAddr(fmt.Sprintf("2001:db8::%x", 10+i)),
		BackendType:   "vxlan",
		BackendData:   []byte(fmt.Sprintf(`{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:%02x"}`, i%256)),
		BackendV6Data: []byte(fmt.Sprintf(`{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4b:%02x"}`, i%256)),
	}
}

// Subnet returns the i-th subnet of cfg's IPv4 network after SubnetMin:
// what the suite asks for as Previous, and the podCIDR a store that does
// not allocate assigns to node i.
func Subnet(cfg lease.Config, i int) netip.Prefix {
	a := cfg.SubnetMin.As4()
	v := uint32(a[0])<<24 | uint32(a[1])<<16 | uint32(a[2])<<8 | uint32(a[3])
	v += uint32(i) << (32 - cfg.SubnetLen)
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)}), cfg.SubnetLen)
}

// Config parses netConf or fails t.
func Config(t testing.TB, netConf string) lease.Config {
	t.Helper()
	c, err := lease.ParseConfig([]byte(netConf))
	if err != nil {
		t.Fatalf("net-conf %s: %v", netConf, err)
	}
	return c
}

// Networks of the suite.
const (
	NetConf     = `{"Network":"10.66.0.0/16","Backend":{"Type":"vxlan"}}`
	smallConf   = `{"Network":"10.67.0.0/24","SubnetLen":26,"Backend":{"Type":"vxlan"}}` // 3 subnets
	ipv6OnlyNet = `{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fd00:66::/56","Backend":{"Type":"vxlan"}}`
)

// Run runs the contract suite against the store f builds.
func Run(t *testing.T, f Factory) {
	tests := []struct {
		name string
		run  func(t *testing.T, f Factory)
	}{
		{"AcquireReusesOwnLease", testAcquireReuse},
		{"AcquirePrevious", testAcquirePrevious},
		{"AcquireExhaustion", testExhaustion},
		{"AcquireNotAssigned", testNotAssigned},
		{"Identity", testIdentity},
		{"KeepLostOnDelete", testKeepDelete},
		{"KeepLostOnTakeOver", testKeepTakeOver},
		{"KeepNilOnCancel", testKeepCancel},
		{"Watch", testWatch},
		{"WatchAfterGap", testGap},
		{"HostileLeasesIgnored", testHostile},
		{"MalformedSkipped", testMalformed},
		{"Republish", testRepublish},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if !f.Sequential {
				t.Parallel()
			}
			tc.run(t, f)
		})
	}
}

// logs is a log buffer with a line counter.
type logs struct{ testenv.LogBuffer }

// count returns how many logged lines contain every part.
func (b *logs) count(parts ...string) int {
	n := 0
	for line := range strings.Lines(b.String()) {
		ok := true
		for _, p := range parts {
			ok = ok && strings.Contains(line, p)
		}
		if ok {
			n++
		}
	}
	return n
}
