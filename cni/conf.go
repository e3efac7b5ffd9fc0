package cni

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/netip"
	"strings"

	"github.com/containernetworking/cni/pkg/types"

	flannel "github.com/flannelkit/flannel"
)

// Defaults of the config keys, as upstream's plugin has them.
const (
	DefaultSubnetFile = "/run/flannel/subnet.env"
	DefaultDataDir    = "/var/lib/cni/flannel"
)

// NetConf is the flannel plugin's network configuration: the standard keys
// plus upstream's own.
type NetConf struct {
	types.NetConf

	// SubnetFile is the subnet.env flanneld writes (default
	// /run/flannel/subnet.env).
	SubnetFile string `json:"subnetFile,omitempty"`
	// DataDir keeps each container's rendered delegate config, which DEL
	// replays (default /var/lib/cni/flannel).
	DataDir string `json:"dataDir,omitempty"`
	// Delegate is the delegate plugin's config; its type defaults to
	// bridge. It must not set name or ipam: both are filled in.
	Delegate map[string]any `json:"delegate,omitempty"`
	// IPAM holds overrides merged into the host-local config (shadows
	// types.NetConf's IPAM, which only has a type).
	IPAM map[string]any `json:"ipam,omitempty"`
	// RuntimeConfig is passed to the delegate as it is (portMappings,
	// bandwidth, ...).
	RuntimeConfig map[string]any `json:"runtimeConfig,omitempty"`
}

// ParseNetConf decodes the plugin's stdin config and fills in the
// defaults (p's, then upstream's). The error is a *types.Error naming the
// offending key.
func (p *Plugin) ParseNetConf(stdin []byte) (*NetConf, error) {
	n := &NetConf{}
	if err := json.Unmarshal(stdin, n); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("flannel: parse network config: %v", err), "")
	}
	if n.SubnetFile == "" {
		n.SubnetFile = or(p.SubnetFile, DefaultSubnetFile)
	}
	if n.DataDir == "" {
		n.DataDir = or(p.DataDir, DefaultDataDir)
	}
	if n.Delegate == nil {
		n.Delegate = map[string]any{}
	}
	// The delegates decode their config with encoding/json, which matches
	// keys case-insensitively: "tYpe" next to the "type" filled in here
	// would make what runs depend on the decoder. Keys that the plugin
	// reads or fills in must be spelt exactly.
	if err := exactKeys("delegate", n.Delegate, "type", "name", "ipam", "cniVersion", "mtu", "ipMasq", "isGateway", "runtimeConfig", "prevResult"); err != nil {
		return nil, err
	}
	if err := exactKeys("ipam", n.IPAM, "type", "ranges", "routes"); err != nil {
		return nil, err
	}
	if t, ok := n.Delegate["type"]; ok {
		if s, isStr := t.(string); !isStr || s == "" {
			return nil, invalid("flannel: delegate.type %v: must be a plugin name (a non-empty string)", t)
		}
	}
	for _, k := range []string{"name", "ipam"} {
		if _, ok := n.Delegate[k]; ok {
			return nil, invalid("flannel: delegate.%s is set: the flannel plugin fills it in (remove it from the delegate; put IPAM overrides in the top-level ipam key)", k)
		}
	}
	if t, ok := n.IPAM["type"]; ok {
		if s, isStr := t.(string); !isStr || s == "" {
			return nil, invalid("flannel: ipam.type %v: must be a plugin name (a non-empty string)", t)
		}
	}
	if r, ok := n.IPAM["routes"]; ok {
		if _, isList := r.([]any); !isList {
			return nil, invalid("flannel: ipam.routes: must be a list of routes")
		}
	}
	return n, nil
}

func exactKeys(where string, m map[string]any, keys ...string) error {
	for k := range m {
		for _, want := range keys {
			if k != want && strings.EqualFold(k, want) {
				return invalid("flannel: %s.%s: write %q (keys are case-sensitive)", where, k, want)
			}
		}
	}
	return nil
}

func invalid(format string, args ...any) *types.Error {
	return types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf(format, args...), "")
}

func or(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// DelegateConf renders the delegate's config from n and the node's
// subnet.env, as upstream's plugin does:
//   - type bridge unless the delegate says otherwise; name and cniVersion
//     from n;
//   - mtu from FLANNEL_MTU and ipMasq as the opposite of FLANNEL_IPMASQ,
//     unless the delegate sets them; isGateway true for bridge unless set;
//   - ipam: n's overrides, type host-local unless set, one range set per
//     family from FLANNEL_SUBNET and FLANNEL_IPV6_SUBNET, and routes to
//     FLANNEL_NETWORK and FLANNEL_IPV6_NETWORK after any given ones;
//   - runtimeConfig as given.
//
// The prevResult of a chain is not part of it: it is added per call.
func DelegateConf(n *NetConf, env flannel.SubnetEnv) map[string]any {
	d := maps.Clone(n.Delegate)
	if _, ok := d["type"]; !ok {
		d["type"] = "bridge"
	}
	d["name"] = n.Name
	if n.CNIVersion != "" {
		d["cniVersion"] = n.CNIVersion
	}
	if _, ok := d["mtu"]; !ok && env.MTU > 0 {
		d["mtu"] = env.MTU
	}
	if _, ok := d["ipMasq"]; !ok {
		d["ipMasq"] = !env.IPMasq
	}
	if _, ok := d["isGateway"]; !ok && d["type"] == "bridge" {
		d["isGateway"] = true
	}
	ipam := maps.Clone(n.IPAM)
	if ipam == nil {
		ipam = map[string]any{}
	}
	if _, ok := ipam["type"]; !ok {
		ipam["type"] = "host-local"
	}
	var ranges [][]map[string]any
	var routes []any
	if r, ok := ipam["routes"].([]any); ok {
		routes = append(routes, r...)
	}
	for _, f := range []struct{ net, subnet netip.Prefix }{{env.Network, env.Subnet}, {env.IPv6Network, env.IPv6Subnet}} {
		if f.subnet.IsValid() {
			ranges = append(ranges, []map[string]any{{"subnet": f.subnet.Masked().String()}})
		}
		if f.net.IsValid() {
			routes = append(routes, map[string]any{"dst": f.net.Masked().String()})
		}
	}
	ipam["ranges"] = ranges
	ipam["routes"] = routes
	d["ipam"] = ipam
	if len(n.RuntimeConfig) > 0 {
		d["runtimeConfig"] = n.RuntimeConfig
	}
	return d
}
