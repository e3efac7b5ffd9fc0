package lease

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"sort"
	"strings"
)

// Redacted stands for a secret value in logs and in String.
const Redacted = "[redacted]"

// secretKey reports whether a Backend key holds a secret (the ipsec and
// wireguard PSK, and any key, password or token a backend may take).
func secretKey(k string) bool {
	k = strings.ToLower(k)
	for _, s := range []string{"psk", "key", "secret", "password", "token"} {
		if strings.Contains(k, s) {
			return true
		}
	}
	return false
}

// RedactedBackend returns the Backend object with the value of every key
// that may hold a secret replaced by Redacted, keys sorted; a Backend that
// is not a JSON object is described, never quoted.
func (c Config) RedactedBackend() string {
	if isNullOrEmpty(c.Backend) {
		return ""
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(c.Backend, &obj); err != nil {
		return "(not a JSON object)"
	}
	keys := make([]string, 0, len(obj))
	for k := range obj {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b bytes.Buffer
	b.WriteByte('{')
	for i, k := range keys {
		if i > 0 {
			b.WriteByte(',')
		}
		name, _ := json.Marshal(k)
		b.Write(name)
		b.WriteByte(':')
		if secretKey(k) {
			b.WriteString(`"` + Redacted + `"`)
		} else {
			b.Write(bytes.TrimSpace(obj[k]))
		}
	}
	b.WriteByte('}')
	return b.String()
}

// LogValue logs the Config without secrets: the networks, lengths and
// ranges, and the Backend with its secret values redacted.
func (c Config) LogValue() slog.Value {
	attrs := []slog.Attr{slog.String("backend_type", c.BackendType)}
	if c.EnableIPv4 {
		attrs = append(attrs, slog.String("network", c.Network.String()), slog.Int("subnet_len", c.SubnetLen),
			slog.String("subnet_min", c.SubnetMin.String()), slog.String("subnet_max", c.SubnetMax.String()))
	}
	if c.EnableIPv6 {
		attrs = append(attrs, slog.String("ipv6_network", c.IPv6Network.String()), slog.Int("ipv6_subnet_len", c.IPv6SubnetLen),
			slog.String("ipv6_subnet_min", c.IPv6SubnetMin.String()), slog.String("ipv6_subnet_max", c.IPv6SubnetMax.String()))
	}
	if c.EnableNFTables {
		attrs = append(attrs, slog.Bool("nftables", true))
	}
	attrs = append(attrs, slog.String("backend", c.RedactedBackend()))
	return slog.GroupValue(attrs...)
}

// String describes the Config without secrets (see LogValue), so that
// %v and %+v of a Config or of a struct holding one never print a PSK.
func (c Config) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "{EnableIPv4:%t EnableIPv6:%t EnableNFTables:%t", c.EnableIPv4, c.EnableIPv6, c.EnableNFTables)
	if c.EnableIPv4 {
		fmt.Fprintf(&b, " Network:%s SubnetLen:%d SubnetMin:%s SubnetMax:%s", c.Network, c.SubnetLen, c.SubnetMin, c.SubnetMax)
	}
	if c.EnableIPv6 {
		fmt.Fprintf(&b, " IPv6Network:%s IPv6SubnetLen:%d IPv6SubnetMin:%s IPv6SubnetMax:%s", c.IPv6Network, c.IPv6SubnetLen, c.IPv6SubnetMin, c.IPv6SubnetMax)
	}
	fmt.Fprintf(&b, " BackendType:%s Backend:%s}", c.BackendType, c.RedactedBackend())
	return b.String()
}

// GoString is String, so that %#v does not print the raw Backend bytes.
func (c Config) GoString() string { return "lease.Config" + c.String() }
