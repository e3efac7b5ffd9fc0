package lease

import (
	"encoding/json"
	"net/netip"
)

// Config is the cluster network configuration: upstream flannel's
// net-conf.json (a ConfigMap file with the Kubernetes store, the value of
// <prefix>/config with etcd). ParseConfig fills every default, so a Config
// returned by it is complete and valid.
type Config struct {
	EnableIPv4     bool
	EnableIPv6     bool
	EnableNFTables bool

	// IPv4; zero values when EnableIPv4 is false.
	Network   netip.Prefix
	SubnetLen int
	SubnetMin netip.Addr
	SubnetMax netip.Addr

	// IPv6; zero values when EnableIPv6 is false.
	IPv6Network   netip.Prefix
	IPv6SubnetLen int
	IPv6SubnetMin netip.Addr
	IPv6SubnetMax netip.Addr

	// BackendType is Backend.Type ("vxlan" when Backend is absent).
	BackendType string
	// Backend is the raw "Backend" object, Type included; each backend
	// decodes its own keys from it.
	Backend json.RawMessage
}
