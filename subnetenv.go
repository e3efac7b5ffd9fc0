package flannel

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/flannelkit/flannel/lease"
)

// SubnetEnv is the content of subnet.env, the file the flannel CNI plugin
// reads (default path /run/flannel/subnet.env). A family whose Network is
// invalid (zero) is off and its lines are not written.
type SubnetEnv struct {
	// Network is the cluster IPv4 network, e.g. 10.244.0.0/16.
	Network netip.Prefix
	// Subnet holds the first host address of the node's IPv4 lease with the
	// lease length, e.g. 10.244.3.1/24 (not masked, as upstream writes it).
	Subnet netip.Prefix
	// IPv6Network and IPv6Subnet are the same for IPv6.
	IPv6Network netip.Prefix
	IPv6Subnet  netip.Prefix
	// MTU is the MTU pods should use.
	MTU int
	// IPMasq tells the CNI plugin that flannel masquerades pod traffic.
	IPMasq bool
}

// Lease returns the subnets of e as a lease (masked prefixes, no attributes),
// e.g. to pass as lease.Request.Previous.
func (e SubnetEnv) Lease() lease.Lease {
	var l lease.Lease
	if e.Subnet.IsValid() {
		l.Subnet = e.Subnet.Masked()
	}
	if e.IPv6Subnet.IsValid() {
		l.IPv6Subnet = e.IPv6Subnet.Masked()
	}
	return l
}

// SubnetEnvFor builds the subnet.env content for lease l in network cfg: the
// families enabled in cfg, each subnet as its first host address.
func SubnetEnvFor(cfg lease.Config, l lease.Lease, mtu int, ipMasq bool) SubnetEnv {
	e := SubnetEnv{MTU: mtu, IPMasq: ipMasq}
	if cfg.EnableIPv4 && l.Subnet.IsValid() {
		e.Network = cfg.Network
		e.Subnet = firstHost(l.Subnet)
	}
	if cfg.EnableIPv6 && l.IPv6Subnet.IsValid() {
		e.IPv6Network = cfg.IPv6Network
		e.IPv6Subnet = firstHost(l.IPv6Subnet)
	}
	return e
}

func firstHost(p netip.Prefix) netip.Prefix {
	p = p.Masked()
	return netip.PrefixFrom(p.Addr().Next(), p.Bits())
}

const (
	envNetwork     = "FLANNEL_NETWORK"
	envSubnet      = "FLANNEL_SUBNET"
	envIPv6Network = "FLANNEL_IPV6_NETWORK"
	envIPv6Subnet  = "FLANNEL_IPV6_SUBNET"
	envMTU         = "FLANNEL_MTU"
	envIPMasq      = "FLANNEL_IPMASQ"
)

// marshal renders e in upstream flannel's format, one KEY=value per line.
func (e SubnetEnv) marshal() ([]byte, error) {
	v4 := e.Network.IsValid() || e.Subnet.IsValid()
	v6 := e.IPv6Network.IsValid() || e.IPv6Subnet.IsValid()
	if !v4 && !v6 {
		return nil, errors.New("subnet.env: no IPv4 or IPv6 subnet")
	}
	var b bytes.Buffer
	if v4 {
		if !e.Network.IsValid() || !e.Subnet.IsValid() || !e.Network.Addr().Is4() || !e.Subnet.Addr().Is4() {
			return nil, fmt.Errorf("subnet.env: IPv4 network %s and subnet %s must both be valid IPv4 prefixes", e.Network, e.Subnet)
		}
		fmt.Fprintf(&b, "%s=%s\n%s=%s\n", envNetwork, e.Network, envSubnet, e.Subnet)
	}
	if v6 {
		if !e.IPv6Network.IsValid() || !e.IPv6Subnet.IsValid() || !e.IPv6Network.Addr().Is6() || !e.IPv6Subnet.Addr().Is6() {
			return nil, fmt.Errorf("subnet.env: IPv6 network %s and subnet %s must both be valid IPv6 prefixes", e.IPv6Network, e.IPv6Subnet)
		}
		fmt.Fprintf(&b, "%s=%s\n%s=%s\n", envIPv6Network, e.IPv6Network, envIPv6Subnet, e.IPv6Subnet)
	}
	fmt.Fprintf(&b, "%s=%d\n%s=%t\n", envMTU, e.MTU, envIPMasq, e.IPMasq)
	return b.Bytes(), nil
}

// WriteSubnetEnv writes e to path atomically: a temporary file in the same
// directory is written, synced, given mode 0644 and renamed over path, so a
// reader sees either the old or the new content, never a partial one. The
// directory is created when missing. On failure nothing is left behind and
// the old file, if any, is unchanged. It is safe to call repeatedly.
func WriteSubnetEnv(path string, e SubnetEnv) error {
	data, err := e.marshal()
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("write %s: create directory: %w", path, err)
	}
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	tmp := f.Name()
	fail := func(err error) error {
		_ = f.Close()
		_ = os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := f.Write(data); err != nil {
		return fail(err)
	}
	if err := f.Chmod(0o644); err != nil {
		return fail(err)
	}
	if err := f.Sync(); err != nil {
		return fail(err)
	}
	if err := f.Close(); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		_ = os.Remove(tmp)
		return fmt.Errorf("write %s: %w", path, err)
	}
	// Make the rename durable; best effort, the content is already correct.
	if d, err := os.Open(dir); err == nil {
		_ = d.Sync()
		_ = d.Close()
	}
	return nil
}

// ReadSubnetEnv reads a subnet.env file. Blank lines, comments (#), lines
// without '=' and unknown keys are ignored; an "export " prefix and quotes
// around values are accepted. A known key with a malformed value is an error
// naming the line and key. A missing file yields an error wrapping
// fs.ErrNotExist. The file must hold FLANNEL_SUBNET or FLANNEL_IPV6_SUBNET.
func ReadSubnetEnv(path string) (SubnetEnv, error) {
	e, _, err := readSubnetEnv(path)
	return e, err
}

// ReadCompleteSubnetEnv reads subnet.env as the CNI plugin needs it: like
// ReadSubnetEnv, and every key of each family present (FLANNEL_NETWORK with
// FLANNEL_SUBNET, FLANNEL_IPV6_NETWORK with FLANNEL_IPV6_SUBNET) plus
// FLANNEL_MTU (positive) and FLANNEL_IPMASQ must be set, and each subnet
// must lie inside its network. The error names the file and the missing or
// inconsistent keys; ErrSubnetEnvIncomplete marks a file that lacks keys
// (a writer that is not done, or not flannel's), ErrSubnetEnvInvalid one
// whose values contradict each other.
func ReadCompleteSubnetEnv(path string) (SubnetEnv, error) {
	e, seen, err := readSubnetEnv(path)
	if err != nil {
		return e, err
	}
	var missing []string
	need := []string{envMTU, envIPMasq}
	if seen[envNetwork] || seen[envSubnet] {
		need = append(need, envNetwork, envSubnet)
	}
	if seen[envIPv6Network] || seen[envIPv6Subnet] {
		need = append(need, envIPv6Network, envIPv6Subnet)
	}
	for _, k := range need {
		if !seen[k] {
			missing = append(missing, k)
		}
	}
	if len(missing) > 0 {
		return SubnetEnv{}, fmt.Errorf("read %s: %w: %s not set", path, ErrSubnetEnvIncomplete, strings.Join(missing, ", "))
	}
	if e.MTU <= 0 {
		return SubnetEnv{}, fmt.Errorf("read %s: %w: %s %d: must be positive", path, ErrSubnetEnvInvalid, envMTU, e.MTU)
	}
	for _, f := range []struct {
		nk, sk      string
		net, subnet netip.Prefix
	}{{envNetwork, envSubnet, e.Network, e.Subnet}, {envIPv6Network, envIPv6Subnet, e.IPv6Network, e.IPv6Subnet}} {
		if f.subnet.IsValid() && (f.subnet.Bits() < f.net.Bits() || !f.net.Masked().Contains(f.subnet.Addr())) {
			return SubnetEnv{}, fmt.Errorf("read %s: %w: %s %s is not inside %s %s", path, ErrSubnetEnvInvalid, f.sk, f.subnet, f.nk, f.net)
		}
	}
	return e, nil
}

// Errors wrapped by ReadCompleteSubnetEnv: keys missing, or values that
// contradict each other.
var (
	ErrSubnetEnvIncomplete = errors.New("subnet env incomplete")
	ErrSubnetEnvInvalid    = errors.New("subnet env invalid")
)

func readSubnetEnv(path string) (SubnetEnv, map[string]bool, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return SubnetEnv{}, nil, fmt.Errorf("read subnet env: %w", err)
	}
	var e SubnetEnv
	seen := map[string]bool{}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		line = strings.TrimPrefix(line, "export ")
		key, val, ok := strings.Cut(line, "=")
		if !ok {
			continue
		}
		key = strings.TrimSpace(key)
		val = unquote(strings.TrimSpace(val))
		bad := func(err error) error {
			return fmt.Errorf("read %s: line %d: %s %q: %w", path, n, key, val, err)
		}
		switch key {
		case envNetwork, envSubnet, envIPv6Network, envIPv6Subnet:
			p, err := netip.ParsePrefix(val)
			if err != nil {
				return SubnetEnv{}, nil, bad(err)
			}
			wantV6 := key == envIPv6Network || key == envIPv6Subnet
			if p.Addr().Is6() != wantV6 || p.Addr().Is4In6() {
				return SubnetEnv{}, nil, bad(fmt.Errorf("wrong address family"))
			}
			switch key {
			case envNetwork:
				e.Network = p
			case envSubnet:
				e.Subnet = p
			case envIPv6Network:
				e.IPv6Network = p
			case envIPv6Subnet:
				e.IPv6Subnet = p
			}
		case envMTU:
			mtu, err := strconv.Atoi(val)
			if err != nil || mtu < 0 {
				return SubnetEnv{}, nil, bad(errors.New("not a non-negative integer"))
			}
			e.MTU = mtu
		case envIPMasq:
			b, err := strconv.ParseBool(val)
			if err != nil {
				return SubnetEnv{}, nil, bad(errors.New("not a boolean"))
			}
			e.IPMasq = b
		}
		switch key {
		case envNetwork, envSubnet, envIPv6Network, envIPv6Subnet, envMTU, envIPMasq:
			seen[key] = true
		}
	}
	if err := sc.Err(); err != nil {
		return SubnetEnv{}, nil, fmt.Errorf("read %s: %w", path, err)
	}
	if !e.Subnet.IsValid() && !e.IPv6Subnet.IsValid() {
		return SubnetEnv{}, nil, fmt.Errorf("read %s: %w: neither %s nor %s is set", path, ErrSubnetEnvIncomplete, envSubnet, envIPv6Subnet)
	}
	return e, seen, nil
}

func unquote(s string) string {
	if len(s) >= 2 && (s[0] == '"' || s[0] == '\'') && s[len(s)-1] == s[0] {
		return s[1 : len(s)-1]
	}
	return s
}
