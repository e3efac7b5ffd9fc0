package lease

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
	"time"
)

// Lease is one node's hold on a subnet of the cluster network. Subnet is the
// IPv4 subnet and IPv6Subnet the IPv6 one; an invalid (zero) prefix means the
// family is not used. Prefixes are always masked.
type Lease struct {
	Subnet     netip.Prefix
	IPv6Subnet netip.Prefix
	Attrs      Attrs
	// Expiration is when the store drops the lease unless renewed; zero
	// means it does not expire (a reservation, or a Kubernetes lease).
	Expiration time.Time
}

// Attrs are what a node publishes about itself with its lease. The JSON form
// is byte-compatible with upstream flannel's etcd values; see MarshalJSON.
type Attrs struct {
	PublicIP      netip.Addr
	PublicIPv6    netip.Addr
	BackendType   string
	BackendData   json.RawMessage
	BackendV6Data json.RawMessage
}

// Key returns the lease's identity as upstream flannel spells it in etcd:
// "10.244.3.0-24" or "10.244.3.0-24&fd00:10:244:3::-64". An IPv6-only lease
// keeps upstream's empty IPv4 part: "0.0.0.0-0&fd00:10:244:3::-64".
func (l Lease) Key() string {
	v4 := "0.0.0.0-0"
	if l.Subnet.IsValid() {
		v4 = l.Subnet.Addr().String() + "-" + strconv.Itoa(l.Subnet.Bits())
	}
	if !l.IPv6Subnet.IsValid() {
		return v4
	}
	return v4 + "&" + l.IPv6Subnet.Addr().String() + "-" + strconv.Itoa(l.IPv6Subnet.Bits())
}

// String names the lease for logs and errors.
func (l Lease) String() string {
	switch {
	case l.Subnet.IsValid() && l.IPv6Subnet.IsValid():
		return l.Subnet.String() + "," + l.IPv6Subnet.String()
	case l.IPv6Subnet.IsValid():
		return l.IPv6Subnet.String()
	default:
		return l.Subnet.String()
	}
}

// SameSubnets reports whether both leases cover the same subnets.
func (l Lease) SameSubnets(o Lease) bool {
	return l.Subnet == o.Subnet && l.IPv6Subnet == o.IPv6Subnet
}

// splitKey splits a lease key "<a.b.c.d>-<len>[&<ipv6>-<len>]" into its
// parts, checking each part's characters: digits and three dots, digits,
// hex digits and colons, digits. It is a regular expression written out,
// since it runs for every key of every listing.
func splitKey(key string) (a4, l4, a6, l6 string, ok bool) {
	v4, v6, has6 := strings.Cut(key, "&")
	a4, l4, ok = strings.Cut(v4, "-")
	if !ok || !dotted4(a4) || !digits(l4) {
		return "", "", "", "", false
	}
	if !has6 {
		return a4, l4, "", "", true
	}
	i := strings.LastIndexByte(v6, '-')
	if i < 0 {
		return "", "", "", "", false
	}
	a6, l6 = v6[:i], v6[i+1:]
	if a6 == "" || strings.IndexFunc(a6, func(r rune) bool { return !isHex(r) && r != ':' }) >= 0 || !digits(l6) {
		return "", "", "", "", false
	}
	return a4, l4, a6, l6, true
}

// dotted4 reports whether s is four non-empty runs of digits joined by dots.
func dotted4(s string) bool {
	for range 3 {
		part, rest, ok := strings.Cut(s, ".")
		if !ok || !digits(part) {
			return false
		}
		s = rest
	}
	return digits(s)
}

// digits reports whether s is one or more ASCII digits.
func digits(s string) bool {
	return s != "" && strings.IndexFunc(s, func(r rune) bool { return r < '0' || r > '9' }) < 0
}

func isHex(r rune) bool {
	return (r >= '0' && r <= '9') || (r >= 'a' && r <= 'f') || (r >= 'A' && r <= 'F')
}

// ParseKey parses a lease key as written by Key (and by upstream flannel).
// The IPv4 part "0.0.0.0-0" means no IPv4 subnet.
func ParseKey(key string) (v4, v6 netip.Prefix, err error) {
	a4, l4, a6, l6, ok := splitKey(key)
	if !ok {
		return v4, v6, fmt.Errorf("lease key %q: want <ipv4>-<len>[&<ipv6>-<len>]", key)
	}
	v4, err = parsePrefixParts(a4, l4, 32)
	if err != nil {
		return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("lease key %q: %w", key, err)
	}
	if v4.Bits() == 0 && v4.Addr().IsUnspecified() {
		v4 = netip.Prefix{}
	}
	if a6 != "" {
		v6, err = parsePrefixParts(a6, l6, 128)
		if err != nil {
			return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("lease key %q: %w", key, err)
		}
	}
	if !v4.IsValid() && !v6.IsValid() {
		return netip.Prefix{}, netip.Prefix{}, fmt.Errorf("lease key %q: no subnet", key)
	}
	return v4, v6, nil
}

func parsePrefixParts(addr, bits string, maxBits int) (netip.Prefix, error) {
	a, err := netip.ParseAddr(addr)
	if err != nil {
		return netip.Prefix{}, err
	}
	if (maxBits == 32) != a.Is4() {
		return netip.Prefix{}, fmt.Errorf("address %s is not IPv%d", a, map[int]int{32: 4, 128: 6}[maxBits])
	}
	n, err := strconv.Atoi(bits)
	if err != nil || n < 0 || n > maxBits {
		return netip.Prefix{}, fmt.Errorf("prefix length %q out of range 0-%d", bits, maxBits)
	}
	p := netip.PrefixFrom(a, n)
	if p.Masked() != p {
		return netip.Prefix{}, fmt.Errorf("%s has host bits set", p)
	}
	return p, nil
}

// Snapshot is what a store's Watch delivers: the complete current set of
// leases in the store (the caller's own included). Watch delivers a snapshot
// first, again after every gap (reconnect, relist, compaction), and after
// every change; each one replaces the previous, so a consumer that applies
// the latest snapshot is always level-triggered.
type Snapshot struct {
	// Leases are read-only: a store may share their array between
	// snapshots (lease.Feed), so a consumer that wants to change them
	// copies them. Keeping them is safe; a store never writes a lease it
	// delivered.
	Leases []Lease
	// Resync is true for the first snapshot and for one delivered after a
	// gap in the watch, when changes may have been missed.
	Resync bool
}

// Request is what a node asks a store for in Acquire.
type Request struct {
	// Attrs are published with the lease. PublicIP/PublicIPv6 identify the
	// node to stores that reclaim leases by public IP (etcd, memory).
	Attrs Attrs
	// Previous are the subnets this node held before (e.g. read from
	// subnet.env); a store reuses them when still valid and free. Optional.
	Previous Lease
}
