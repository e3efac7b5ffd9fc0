package wireguard

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/internal/confjson"
	"github.com/flannelkit/flannel/lease"
)

// Type is the backend's name in net-conf.json.
const Type = "wireguard"

// Defaults, as upstream flannel uses them.
const (
	DefaultListenPort     = 51820
	DefaultListenPortV6   = 51821
	DefaultRepairInterval = 10 * time.Second
	// DefaultKeyFile is where upstream's flanneld keeps the private key
	// (its WIREGUARD_KEY_FILE overrides it). The library never uses it on
	// its own: Options.KeyFile is the caller's choice.
	DefaultKeyFile = "/run/flannel/wgkey"
	// DeviceName and DeviceNameV6 are upstream's device names.
	DeviceName   = "flannel-wg"
	DeviceNameV6 = "flannel-wg-v6"
	// Overhead4 and Overhead6 are what WireGuard adds to a packet over an
	// IPv4 and an IPv6 underlay: the outer IP header (20/40), UDP (8), and
	// the data message header (type, receiver index, counter: 16) and
	// authentication tag (16).
	Overhead4 = 60
	Overhead6 = 80
)

// Mode says how the address families map to devices.
type Mode string

// Modes, as upstream spells them.
const (
	// ModeSeparate: flannel-wg carries IPv4 between IPv4 endpoints and
	// flannel-wg-v6 IPv6 between IPv6 endpoints (the default).
	ModeSeparate Mode = "separate"
	// ModeAuto: one device carries both families; per peer the endpoint is
	// IPv4 unless only IPv6 can work (upstream's choice, see endpointFamily).
	ModeAuto Mode = "auto"
	// ModeIPv4 and ModeIPv6: one device, endpoints of that family.
	ModeIPv4 Mode = "ipv4"
	ModeIPv6 Mode = "ipv6"
)

// Options configure a Backend. The zero value is upstream's default
// configuration with a key that lives in memory only.
type Options struct {
	// PSK is the WireGuard pre-shared key of every peer, 32 bytes.
	// Optional: none. It never appears in logs or errors.
	PSK []byte
	// ListenPort is the UDP port of flannel-wg. Optional: 51820.
	ListenPort int
	// ListenPortV6 is the UDP port of flannel-wg-v6 (ModeSeparate).
	// Optional: 51821.
	ListenPortV6 int
	// MTU is the underlay MTU the device MTU is derived from (minus 60
	// over IPv4, 80 over IPv6). Optional: the external interface's.
	MTU int
	// PersistentKeepalive is the keepalive interval of every peer.
	// Optional: 0, off.
	PersistentKeepalive time.Duration
	// Mode maps families to devices. Optional: ModeSeparate.
	Mode Mode
	// KeyFile keeps the private key: read when it exists, else a new key
	// is generated and written there (mode 0400, the directory created),
	// in upstream's format (base64, no newline). A restart with the file
	// kept keeps the public key. Optional: without it the key is made once
	// per Backend and kept in memory only.
	KeyFile string
	// RepairInterval is how often Network.Run re-applies the last peer
	// set (a peer deleted by hand announces itself by no kernel event).
	// Optional: 10s.
	RepairInterval time.Duration
}

func (o Options) withDefaults() Options {
	if o.ListenPort == 0 {
		o.ListenPort = DefaultListenPort
	}
	if o.ListenPortV6 == 0 {
		o.ListenPortV6 = DefaultListenPortV6
	}
	if o.Mode == "" {
		o.Mode = ModeSeparate
	}
	if o.RepairInterval <= 0 {
		o.RepairInterval = DefaultRepairInterval
	}
	return o
}

// validate checks the options; errors never quote the PSK.
func (o Options) validate() error {
	bad := func(key, format string, args ...any) error {
		return fmt.Errorf("%w: Backend.%s: %s", lease.ErrInvalidConfig, key, fmt.Sprintf(format, args...))
	}
	switch {
	case o.PSK != nil && len(o.PSK) != 32:
		return bad("PSK", "a key of %d bytes, want 32 (base64 of 32 bytes, as `wg genpsk` prints)", len(o.PSK))
	case o.ListenPort < 1 || o.ListenPort > 65535:
		return bad("ListenPort", "%d out of range 1..65535", o.ListenPort)
	case o.ListenPortV6 < 1 || o.ListenPortV6 > 65535:
		return bad("ListenPortV6", "%d out of range 1..65535", o.ListenPortV6)
	case o.MTU != 0 && (o.MTU < 1280 || o.MTU > 65535):
		return bad("MTU", "%d out of range 1280..65535", o.MTU)
	case o.PersistentKeepalive < 0 || o.PersistentKeepalive > 65535*time.Second:
		return bad("PersistentKeepaliveInterval", "%v out of range 0..65535s", o.PersistentKeepalive)
	case o.PersistentKeepalive%time.Second != 0:
		return bad("PersistentKeepaliveInterval", "%v is not whole seconds", o.PersistentKeepalive)
	}
	switch o.Mode {
	case ModeSeparate, ModeAuto, ModeIPv4, ModeIPv6:
	default:
		return bad("Mode", "%q unknown (want separate, auto, ipv4 or ipv6)", string(o.Mode))
	}
	return nil
}

// configKeys are the keys of the "Backend" object, matched
// case-insensitively as encoding/json (and so upstream) does.
func configKeys() []string {
	return []string{"Type", "PSK", "ListenPort", "ListenPortV6", "MTU", "PersistentKeepaliveInterval", "Mode"}
}

// ParseConfig decodes the "Backend" object of net-conf.json: PSK (base64
// of 32 bytes), ListenPort, ListenPortV6, MTU, PersistentKeepaliveInterval
// (whole seconds) and Mode, as upstream reads them. An unknown key, a value
// of the wrong type or out of range is an error wrapping
// lease.ErrInvalidConfig that names the key (and never quotes the PSK). An
// empty or null object means the defaults. KeyFile and RepairInterval are
// not net-conf keys: the caller sets them.
func ParseConfig(raw json.RawMessage) (Options, error) {
	var o Options
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return o, nil
	}
	var keys map[string]json.RawMessage
	if err := json.Unmarshal(raw, &keys); err != nil {
		return o, fmt.Errorf("%w: Backend: not a JSON object", lease.ErrInvalidConfig)
	}
	for k, v := range keys {
		canon := ""
		for _, c := range configKeys() {
			if strings.EqualFold(k, c) {
				canon = c
			}
		}
		var err error
		switch canon {
		case "":
			return Options{}, fmt.Errorf("%w: Backend.%s: unknown key for the %s backend (known: %s)",
				lease.ErrInvalidConfig, k, Type, strings.Join(configKeys(), ", "))
		case "Type":
			var t string
			if json.Unmarshal(v, &t) != nil || t != Type {
				err = fmt.Errorf("%s is not %q", v, Type)
			}
		case "PSK":
			o.PSK, err = decodePSK(v)
		case "ListenPort":
			o.ListenPort, err = confjson.Int(v, 1, 65535)
		case "ListenPortV6":
			o.ListenPortV6, err = confjson.Int(v, 1, 65535)
		case "MTU":
			o.MTU, err = confjson.Int(v, 1280, 65535)
		case "PersistentKeepaliveInterval":
			var secs int
			secs, err = confjson.Int(v, 0, 65535)
			o.PersistentKeepalive = time.Duration(secs) * time.Second
		case "Mode":
			var m string
			if json.Unmarshal(v, &m) != nil {
				err = errors.New("want a string: separate, auto, ipv4 or ipv6")
			}
			o.Mode = Mode(m)
			if m == "" {
				o.Mode = ModeSeparate
			}
		}
		if err != nil {
			return Options{}, fmt.Errorf("%w: Backend.%s: %v", lease.ErrInvalidConfig, canonOr(canon, k), err)
		}
	}
	return o, o.withDefaults().validate()
}

func canonOr(canon, k string) string {
	if canon == "" {
		return k
	}
	return canon
}

// decodePSK reads a base64 key of 32 bytes; the error never quotes it.
func decodePSK(v json.RawMessage) ([]byte, error) {
	var s string
	if err := json.Unmarshal(v, &s); err != nil {
		return nil, errors.New("want a string (base64 of 32 bytes, as `wg genpsk` prints)")
	}
	if s == "" {
		return nil, nil // upstream: an empty PSK is no PSK
	}
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil || len(b) != 32 {
		return nil, errors.New("not base64 of 32 bytes (as `wg genpsk` prints)")
	}
	return b, nil
}

// FromConfig builds a wireguard backend from the network configuration,
// with the key in memory only; for a backend.Registry. Use Constructor to
// keep the key in a file. Errors wrap lease.ErrInvalidConfig and name the
// key.
func FromConfig(cfg lease.Config) (flannel.Backend, error) {
	return Constructor(Options{})(cfg)
}

// Constructor returns a backend.Registry constructor that reads the
// net-conf keys from the configuration and takes KeyFile and
// RepairInterval from base (its other fields are ignored).
func Constructor(base Options) backend.Constructor {
	return func(cfg lease.Config) (flannel.Backend, error) {
		if cfg.BackendType != "" && cfg.BackendType != Type {
			return nil, fmt.Errorf("%w: Backend.Type %q is not %q", lease.ErrInvalidConfig, cfg.BackendType, Type)
		}
		o, err := ParseConfig(cfg.Backend)
		if err != nil {
			return nil, err
		}
		o.KeyFile, o.RepairInterval = base.KeyFile, base.RepairInterval
		return New(o)
	}
}

// String describes the options without the PSK.
func (o Options) String() string {
	psk := "none"
	if o.PSK != nil {
		psk = "<redacted>"
	}
	return fmt.Sprintf("wireguard.Options{PSK:%s ListenPort:%d ListenPortV6:%d MTU:%d PersistentKeepalive:%v Mode:%s KeyFile:%q RepairInterval:%v}",
		psk, o.ListenPort, o.ListenPortV6, o.MTU, o.PersistentKeepalive, o.Mode, o.KeyFile, o.RepairInterval)
}

// GoString is String, so %#v does not print the PSK either.
func (o Options) GoString() string { return o.String() }

// LogValue keeps the PSK out of slog output.
func (o Options) LogValue() slog.Value { return slog.StringValue(o.String()) }
