package ipip

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
)

// Type is the backend's name in net-conf.json.
const Type = "ipip"

const (
	// DeviceName is upstream's name of the tunnel device.
	DeviceName = "flannel.ipip"
	// Overhead is what the outer IPv4 header costs.
	Overhead = 20
	// DefaultRepairInterval is how often Run re-applies the last peer set.
	DefaultRepairInterval = 10 * time.Second
	// minMTU is the least IPv4 MTU (RFC 791).
	minMTU = 68
)

// Options configure a Backend. The zero value is upstream's default.
type Options struct {
	// DirectRouting routes peers on the external interface's segment
	// without the tunnel. Optional: off.
	DirectRouting bool
	// RepairInterval is how often Run re-applies the last peer set.
	// Optional: 10s.
	RepairInterval time.Duration
}

func (o Options) withDefaults() Options {
	if o.RepairInterval <= 0 {
		o.RepairInterval = DefaultRepairInterval
	}
	return o
}

// ParseOptions decodes the "Backend" object of net-conf.json: upstream's
// only key is DirectRouting. Keys match case-insensitively; an unknown key
// or a value of the wrong type is an error wrapping lease.ErrInvalidConfig
// that names the key.
func ParseOptions(raw json.RawMessage) (Options, error) {
	var o Options
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return o, nil
	}
	var keys map[string]json.RawMessage
	if err := json.Unmarshal(raw, &keys); err != nil {
		return o, fmt.Errorf("%w: Backend: %v", lease.ErrInvalidConfig, err)
	}
	for k, v := range keys {
		switch {
		case strings.EqualFold(k, "Type"):
		case strings.EqualFold(k, "DirectRouting"):
			if err := json.Unmarshal(v, &o.DirectRouting); err != nil {
				return o, fmt.Errorf("%w: Backend.%s: not a boolean: %v", lease.ErrInvalidConfig, k, err)
			}
		default:
			return o, fmt.Errorf("%w: Backend.%s: unknown key for the %s backend (it has DirectRouting)", lease.ErrInvalidConfig, k, Type)
		}
	}
	return o, nil
}

// CheckConfig rejects what ipip cannot carry: an IPv6 network, dual-stack
// or IPv6-only (upstream's ipip is IPv4 only, and so is this one). The
// error wraps lease.ErrInvalidConfig.
func CheckConfig(cfg lease.Config) error {
	if cfg.BackendType != "" && cfg.BackendType != Type {
		return fmt.Errorf("%w: Backend.Type %q is not %q", lease.ErrInvalidConfig, cfg.BackendType, Type)
	}
	if cfg.EnableIPv6 {
		return fmt.Errorf("%w: EnableIPv6: the %s backend is IPv4 only (as upstream's); use vxlan or wireguard for IPv6", lease.ErrInvalidConfig, Type)
	}
	return nil
}

// FromConfig builds an ipip backend from the network configuration, for a
// backend.Registry (see ParseOptions and CheckConfig).
func FromConfig(cfg lease.Config) (flannel.Backend, error) {
	if err := CheckConfig(cfg); err != nil {
		return nil, err
	}
	o, err := ParseOptions(cfg.Backend)
	if err != nil {
		return nil, err
	}
	return New(o), nil
}
