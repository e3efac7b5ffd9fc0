package etcdstore

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strings"

	"github.com/flannelkit/flannel/lease"
)

// parse turns one etcd key-value under <prefix>/subnets/ into a lease. The
// error names the key. Expiration is left zero.
func (s *Store) parse(key, value []byte) (lease.Lease, error) {
	k := string(key)
	name, ok := strings.CutPrefix(k, s.subnetsKey)
	if !ok {
		return lease.Lease{}, fmt.Errorf("etcd key %s is not under %s", k, s.subnetsKey)
	}
	v4, v6, err := lease.ParseKey(name)
	if err != nil {
		return lease.Lease{}, fmt.Errorf("etcd key %s: %w", k, err)
	}
	l := lease.Lease{Subnet: v4, IPv6Subnet: v6}
	if err := json.Unmarshal(value, &l.Attrs); err != nil {
		return l, fmt.Errorf("etcd key %s: value: %w", k, err)
	}
	return l, nil
}

// identity is the address that identifies a node's lease, as upstream
// flannel matches it: PublicIP, or PublicIPv6 for a node without one.
func identity(a lease.Attrs) netip.Addr {
	if a.PublicIP.IsValid() {
		return a.PublicIP
	}
	return a.PublicIPv6
}

// sameNode reports whether b was published by the node whose attributes
// are a (same identifying public IP).
func sameNode(a, b lease.Attrs) bool {
	id := identity(a)
	if !id.IsValid() {
		return false
	}
	if id.Is4() {
		return b.PublicIP == id
	}
	return b.PublicIPv6 == id
}
