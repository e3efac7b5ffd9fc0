package lease

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
)

// DefaultBackendType is the backend used when net-conf.json has no Backend
// (upstream's code falls back to "udp", its docs say vxlan; we use vxlan).
const DefaultBackendType = "vxlan"

// familyRules are the limits of one address family.
type familyRules struct {
	is4       bool
	prefix    string // key prefix: "" or "IPv6"
	enableKey string // "EnableIPv4" or "EnableIPv6"
	maxSubLen int    // longest subnet: /30 (network, gateway, host, broadcast), /126
	defSubLen int    // default subnet length for large networks
	addrBits  int
}

func rules(is4 bool) familyRules {
	if is4 {
		return familyRules{is4: true, prefix: "", enableKey: "EnableIPv4", maxSubLen: 30, defSubLen: 24, addrBits: 32}
	}
	return familyRules{is4: false, prefix: "IPv6", enableKey: "EnableIPv6", maxSubLen: 126, defSubLen: 64, addrBits: 128}
}

// defaultSubLen returns the default subnet length for a network of the
// given prefix length: defSubLen when there is room for it with four
// subnets to spare, else bits+2 (0 when the network is too small).
func (r familyRules) defaultSubLen(bits int) int {
	switch {
	case bits+2 > r.maxSubLen:
		return 0
	case bits <= r.defSubLen-2:
		return r.defSubLen
	default:
		return bits + 2
	}
}

// WithDefaults returns c with the defaults of ParseConfig filled in where
// fields are zero: SubnetLen/IPv6SubnetLen, SubnetMin/Max and
// IPv6SubnetMin/Max for the enabled families, BackendType (from Backend's
// Type, else "vxlan") and Backend ({"Type":BackendType}). It neither enables
// a family nor validates: call Validate on the result. Defaults that depend
// on an invalid field (e.g. a Network with host bits) are left zero.
func (c Config) WithDefaults() Config {
	if c.EnableIPv4 {
		c.SubnetLen, c.SubnetMin, c.SubnetMax = rules(true).defaults(c.Network, c.SubnetLen, c.SubnetMin, c.SubnetMax)
	}
	if c.EnableIPv6 {
		c.IPv6SubnetLen, c.IPv6SubnetMin, c.IPv6SubnetMax = rules(false).defaults(c.IPv6Network, c.IPv6SubnetLen, c.IPv6SubnetMin, c.IPv6SubnetMax)
	}
	if c.BackendType == "" {
		c.BackendType = DefaultBackendType
		if t, ok := backendTypeOf(c.Backend); ok && t != "" {
			c.BackendType = t
		}
	}
	if isNullOrEmpty(c.Backend) {
		c.Backend, _ = json.Marshal(struct{ Type string }{c.BackendType})
	}
	return c
}

func (r familyRules) defaults(network netip.Prefix, subLen int, min, max netip.Addr) (int, netip.Addr, netip.Addr) {
	if !network.IsValid() || checkPrefixFamily(network, r.is4) != nil || network.Masked() != network {
		return subLen, min, max
	}
	if subLen == 0 {
		subLen = r.defaultSubLen(network.Bits())
	}
	if subLen <= network.Bits() || subLen > r.maxSubLen {
		return subLen, min, max
	}
	shift := uint(r.addrBits - subLen)
	base := addrU128(network.Addr())
	if !min.IsValid() {
		min = base.or(u128{lo: 1}.shl(shift)).addr(r.is4)
	}
	if !max.IsValid() {
		max = base.or(ones(uint(subLen - network.Bits())).shl(shift)).addr(r.is4)
	}
	return subLen, min, max
}

// backendTypeOf returns the Type string of a Backend object; ok is false
// when there is no Type key (or it is null), or Backend is not an object.
func backendTypeOf(b json.RawMessage) (string, bool) {
	t := bytes.TrimSpace(b)
	if len(t) == 0 || t[0] != '{' {
		return "", false
	}
	var obj map[string]json.RawMessage
	if json.Unmarshal(t, &obj) != nil {
		return "", false
	}
	s, ok, err := getString(obj, "Type")
	return s, ok && err == nil
}

// Validate checks a complete Config (as ParseConfig returns, or as built in
// code and passed through WithDefaults). It returns a *ConfigError wrapping
// ErrInvalidConfig naming the first field at fault. A valid Config has at
// least one family enabled; for each enabled family a network of the right
// family without host bits, a subnet length that leaves at least four
// subnets and at most 2^63, and SubnetMin <= SubnetMax aligned inside the
// network; the fields of a disabled family are zero; and a Backend object
// whose Type (default vxlan) equals BackendType.
func (c Config) Validate() error {
	if !c.EnableIPv4 && !c.EnableIPv6 {
		return configErr("EnableIPv4", "false", "IPv4 and IPv6 are both disabled (EnableIPv4 and EnableIPv6 are false)")
	}
	if err := rules(true).validate(c.EnableIPv4, c.Network, c.SubnetLen, c.SubnetMin, c.SubnetMax); err != nil {
		return err
	}
	if err := rules(false).validate(c.EnableIPv6, c.IPv6Network, c.IPv6SubnetLen, c.IPv6SubnetMin, c.IPv6SubnetMax); err != nil {
		return err
	}
	return c.validateBackend()
}

func (r familyRules) validate(enabled bool, network netip.Prefix, subLen int, min, max netip.Addr) error {
	netKey, lenKey := r.prefix+"Network", r.prefix+"SubnetLen"
	minKey, maxKey := r.prefix+"SubnetMin", r.prefix+"SubnetMax"
	if !enabled {
		reason := "set but " + r.enableKey + " is false"
		switch {
		case network.IsValid():
			return configErr(netKey, strconv.Quote(network.String()), reason)
		case subLen != 0:
			return configErr(lenKey, strconv.Itoa(subLen), reason)
		case min.IsValid():
			return configErr(minKey, strconv.Quote(min.String()), reason)
		case max.IsValid():
			return configErr(maxKey, strconv.Quote(max.String()), reason)
		}
		return nil
	}

	if !network.IsValid() {
		return configErr(netKey, "", "missing; required when "+r.enableKey+" is true")
	}
	netVal := strconv.Quote(network.String())
	if err := checkPrefixFamily(network, r.is4); err != nil {
		return configErr(netKey, netVal, err.Error())
	}
	if m := network.Masked(); m != network {
		return configErr(netKey, netVal, fmt.Sprintf("host bits set (the network is %s)", m))
	}
	if network.Bits()+2 > r.maxSubLen {
		return configErr(netKey, netVal, fmt.Sprintf("network too small: the longest usable prefix is /%d", r.maxSubLen-2))
	}

	if subLen < network.Bits()+2 || subLen > r.maxSubLen {
		return configErr(lenKey, strconv.Itoa(subLen), fmt.Sprintf("must be between %d and %d for %s (at least four subnets)", network.Bits()+2, r.maxSubLen, network))
	}
	if subLen-network.Bits() > maxSubnetBits {
		return configErr(lenKey, strconv.Itoa(subLen), fmt.Sprintf("%s holds more than 2^%d subnets of /%d; use a subnet length of at most %d", network, maxSubnetBits, subLen, network.Bits()+maxSubnetBits))
	}

	check := func(key string, a netip.Addr) error {
		if !a.IsValid() {
			return configErr(key, "", "missing")
		}
		val := strconv.Quote(a.String())
		if err := checkAddrFamily(a, r.is4); err != nil {
			return configErr(key, val, err.Error())
		}
		if !network.Contains(a) {
			return configErr(key, val, fmt.Sprintf("outside %s %s", netKey, network))
		}
		if p := netip.PrefixFrom(a, subLen).Masked(); p.Addr() != a {
			return configErr(key, val, fmt.Sprintf("not aligned to %s /%d (%s is)", lenKey, subLen, p.Addr()))
		}
		return nil
	}
	if err := check(minKey, min); err != nil {
		return err
	}
	if err := check(maxKey, max); err != nil {
		return err
	}
	if min.Compare(max) > 0 {
		return configErr(minKey, strconv.Quote(min.String()), fmt.Sprintf("greater than %s %s", maxKey, max))
	}
	return nil
}

func (c Config) validateBackend() error {
	if c.BackendType == "" {
		return configErr("Backend.Type", "", "missing")
	}
	if isNullOrEmpty(c.Backend) {
		return nil
	}
	b := bytes.TrimSpace(c.Backend)
	var obj map[string]json.RawMessage
	if b[0] != '{' || json.Unmarshal(b, &obj) != nil {
		return backendErr(b)
	}
	typ, ok, err := getString(obj, "Type")
	if err != nil {
		return configErr("Backend.Type", string(lookup(obj, "Type")), "want a string")
	}
	if !ok {
		typ = DefaultBackendType
	}
	if typ != c.BackendType {
		return configErr("Backend.Type", strconv.Quote(typ), fmt.Sprintf("differs from BackendType %q", c.BackendType))
	}
	return nil
}

// CheckLease returns nil when l's subnets fit c: exactly the enabled
// families present, each of the configured length, without host bits, and
// inside [SubnetMin, SubnetMax]. Otherwise the error names the subnet and
// what is wrong (wrapping ErrInvalidConfig when c itself is invalid). It
// ignores l's attributes and expiration.
func (c Config) CheckLease(l Lease) error {
	if err := c.Validate(); err != nil {
		return err
	}
	if err := checkFamily(c.EnableIPv4, "IPv4", l.Subnet, c.spaceOrZero(true)); err != nil {
		return fmt.Errorf("lease %s: %w", l, err)
	}
	if err := checkFamily(c.EnableIPv6, "IPv6", l.IPv6Subnet, c.spaceOrZero(false)); err != nil {
		return fmt.Errorf("lease %s: %w", l, err)
	}
	return nil
}

func (c Config) spaceOrZero(is4 bool) space {
	for _, s := range c.spaces() {
		if s.is4 == is4 {
			return s
		}
	}
	return space{}
}

func checkFamily(enabled bool, family string, p netip.Prefix, s space) error {
	switch {
	case !enabled && p.IsValid():
		return fmt.Errorf("has %s subnet %s but %s is disabled", family, p, family)
	case !enabled:
		return nil
	case !p.IsValid():
		return fmt.Errorf("has no %s subnet", family)
	}
	return s.check(p)
}

// check returns nil when p is one of the allocatable subnets of s.
func (s space) check(p netip.Prefix) error {
	a := p.Addr()
	switch {
	case checkAddrFamily(a, s.is4) != nil:
		return fmt.Errorf("subnet %s is not %s", p, s.family)
	case p.Bits() != s.subLen:
		return fmt.Errorf("subnet %s is not a /%d", p, s.subLen)
	case p.Masked() != p:
		return fmt.Errorf("subnet %s has host bits set", p)
	case !s.network.Contains(a) || a.Compare(s.min) < 0 || a.Compare(s.max) > 0:
		return fmt.Errorf("subnet %s is outside %s (%s to %s)", p, s.network, s.min, s.max)
	}
	return nil
}
