package vxlan

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"slices"
	"strconv"
	"strings"
	"time"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/internal/confjson"
	"github.com/flannelkit/flannel/lease"
)

// Type is the backend's name in net-conf.json.
const Type = "vxlan"

// Defaults, as upstream flannel and the Linux kernel use them.
const (
	DefaultVNI            = 1
	DefaultPort           = 8472
	DefaultRepairInterval = 10 * time.Second
	// DefaultResyncInterval is how often, by default, the periodic repair
	// dumps and diffs every entry while the kernel is known to hold the
	// peer set and the kernel subscriptions are open.
	DefaultResyncInterval = 5 * time.Minute
	// overhead4 and overhead6 are the VXLAN encapsulation overheads over an
	// IPv4 and an IPv6 underlay (outer IP + UDP + VXLAN + inner Ethernet).
	overhead4 = 50
	overhead6 = 70
)

// Options configure a Backend. The zero value is upstream's default
// configuration.
type Options struct {
	// VNI is the VXLAN network identifier, 1..16777215. Optional: 1.
	VNI int
	// Port is the UDP destination port. Optional: 8472 (the Linux default).
	Port int
	// GBP enables the VXLAN Group Based Policy extension. Optional: off.
	GBP bool
	// Learning lets the device learn remote MACs (off: entries are only
	// the ones this backend programs). Optional: off.
	Learning bool
	// DirectRouting routes to peers on the same L2 segment without
	// encapsulation. Optional: off.
	DirectRouting bool
	// MTU is the underlay MTU the device MTU is derived from (minus 50 for
	// an IPv4 underlay, 70 for IPv6). Optional: the external interface's.
	MTU int
	// DisableTXChecksum turns off TX checksum offload on the devices, the
	// workaround for kernels whose VXLAN checksums break under NAT.
	// Optional: false leaves the kernel's setting alone.
	DisableTXChecksum bool
	// VtepMAC and VtepMACv6 pin the devices' MAC addresses (e.g. kept by
	// the embedder across reboots). Optional: an existing device's MAC, else
	// the one this Backend used before, else the one published in the
	// node's previous lease (flannel.Env.Previous, same VNI), else a random
	// locally administered unicast address.
	VtepMAC, VtepMACv6 net.HardwareAddr
	// RepairInterval is how often Network.Run re-applies the last peer set.
	// Optional: 10s.
	RepairInterval time.Duration
	// ResyncInterval makes the periodic repair rare: while the kernel is
	// known to hold the last peer set (no kernel error since the last full
	// pass) and the kernel subscriptions that repair deletions at once are
	// open, a RepairInterval tick dumps and diffs every entry only when
	// ResyncInterval has passed since the last repair; otherwise every
	// tick does (a failure is retried after RepairInterval). Entries added
	// or changed by others, which no kernel event reports, go at that
	// resync. Optional: DefaultResyncInterval when RepairInterval is not
	// set either, else RepairInterval (every tick).
	ResyncInterval time.Duration
	// Sockets is how many raw netlink sockets program entries in parallel.
	// Optional: 1 (the kernel serializes most of the work anyway). Without
	// an open Env.NS, entries are written one by one through Env.Handle.
	Sockets int
	// Ignored are the net-conf.json keys ParseOptions accepted without
	// effect (upstream's Windows-only Name and MacPrefix); Prepare warns
	// about each.
	Ignored []string
}

func (o Options) withDefaults() Options {
	if o.VNI == 0 {
		o.VNI = DefaultVNI
	}
	if o.Port == 0 {
		o.Port = DefaultPort
	}
	if o.ResyncInterval <= 0 {
		o.ResyncInterval = o.RepairInterval
		if o.RepairInterval <= 0 {
			o.ResyncInterval = DefaultResyncInterval
		}
	}
	if o.RepairInterval <= 0 {
		o.RepairInterval = DefaultRepairInterval
	}
	if o.Sockets <= 0 {
		o.Sockets = 1
	}
	return o
}

func (o Options) validate() error {
	switch {
	case o.VNI < 0 || o.VNI > 1<<24-1:
		return fmt.Errorf("VNI %d out of range 1..16777215", o.VNI)
	case o.Port < 0 || o.Port > 65535:
		return fmt.Errorf("Port %d out of range 1..65535", o.Port) //nolint:staticcheck // ST1005: Port is the net-conf.json key
	case o.MTU < 0 || (o.MTU > 0 && o.MTU < 68+overhead4):
		return fmt.Errorf("MTU %d too small", o.MTU)
	}
	for _, m := range []net.HardwareAddr{o.VtepMAC, o.VtepMACv6} {
		if m != nil {
			if err := checkMAC(m); err != nil {
				return err
			}
		}
	}
	return nil
}

// checkMAC accepts a 6-byte unicast MAC that is not all zeros.
func checkMAC(m net.HardwareAddr) error {
	if len(m) != 6 {
		return fmt.Errorf("VTEP MAC %s is not a 6-byte Ethernet address", m)
	}
	if m[0]&1 != 0 {
		return fmt.Errorf("VTEP MAC %s is a multicast address", m)
	}
	if bytes.Equal(m, make([]byte, 6)) {
		return fmt.Errorf("VTEP MAC %s is all zeros", m)
	}
	return nil
}

// configKeys are the keys of the "Backend" object the vxlan backend reads,
// matched case-insensitively as encoding/json (and so upstream) does.
func configKeys() []string {
	return []string{"Type", "VNI", "Port", "GBP", "Learning", "DirectRouting", "MTU", "Name", "MacPrefix"}
}

// ParseOptions decodes the "Backend" object of net-conf.json into Options.
// Keys match case-insensitively; an unknown key, a value of the wrong type
// or out of range is an error wrapping lease.ErrInvalidConfig that names
// the key. An empty or null object means the defaults.
func ParseOptions(raw json.RawMessage) (Options, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return Options{}, nil
	}
	var keys map[string]json.RawMessage
	if err := json.Unmarshal(raw, &keys); err != nil {
		return Options{}, fmt.Errorf("%w: Backend: %v", lease.ErrInvalidConfig, err)
	}
	var o Options
	for k, v := range keys {
		var canon string
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
			continue
		case "Name", "MacPrefix":
			// Upstream's Windows backend reads them (the HNS network's
			// name, the VTEP MAC prefix); a net-conf.json shared with
			// Windows nodes carries them. Accepted, with a warning.
			o.Ignored = append(o.Ignored, canon)
			continue
		case "VNI":
			o.VNI, err = confjson.Int(v, 1, 1<<24-1)
		case "Port":
			o.Port, err = confjson.Int(v, 1, 65535)
		case "MTU":
			o.MTU, err = confjson.Int(v, 68+overhead4, 65535)
		case "GBP":
			err = json.Unmarshal(v, &o.GBP)
		case "Learning":
			err = json.Unmarshal(v, &o.Learning)
		case "DirectRouting":
			err = json.Unmarshal(v, &o.DirectRouting)
		}
		if err != nil {
			return Options{}, fmt.Errorf("%w: Backend.%s: %v", lease.ErrInvalidConfig, k, confjson.Describe(err))
		}
	}
	slices.Sort(o.Ignored)
	return o, nil
}

// FromConfig builds a vxlan backend from the network configuration, for a
// backend.Registry. Errors wrap lease.ErrInvalidConfig and name the key.
func FromConfig(cfg lease.Config) (flannel.Backend, error) {
	if cfg.BackendType != "" && cfg.BackendType != Type {
		return nil, fmt.Errorf("%w: Backend.Type %q is not %q", lease.ErrInvalidConfig, cfg.BackendType, Type)
	}
	o, err := ParseOptions(cfg.Backend)
	if err != nil {
		return nil, err
	}
	return New(o)
}

// BackendData is the lease backend data the vxlan backend publishes, byte
// compatible with upstream: {"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:09"}.
type BackendData struct {
	VNI     int
	VtepMAC net.HardwareAddr
}

type backendDataWire struct {
	VNI     int
	VtepMAC string
}

// MarshalJSON writes upstream's form.
func (d BackendData) MarshalJSON() ([]byte, error) {
	return json.Marshal(backendDataWire{VNI: d.VNI, VtepMAC: d.VtepMAC.String()})
}

// ParseBackendData decodes a peer's BackendData (or BackendV6Data). It
// fails when the JSON is malformed or VtepMAC is missing or not a unicast
// 6-byte MAC; the VNI is informational (upstream ignores it too).
func ParseBackendData(raw json.RawMessage) (BackendData, error) {
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return BackendData{}, errors.New("no vxlan backend data")
	}
	if d, ok := parseCanonical(raw); ok {
		return d, nil
	}
	var w backendDataWire
	if err := json.Unmarshal(raw, &w); err != nil {
		return BackendData{}, fmt.Errorf("vxlan backend data: %v", confjson.Describe(err))
	}
	if w.VtepMAC == "" {
		return BackendData{}, errors.New("vxlan backend data: no VtepMAC")
	}
	mac, err := net.ParseMAC(w.VtepMAC)
	if err != nil {
		return BackendData{}, fmt.Errorf("vxlan backend data: VtepMAC: %w", err)
	}
	if err := checkMAC(mac); err != nil {
		return BackendData{}, fmt.Errorf("vxlan backend data: %w", err)
	}
	return BackendData{VNI: w.VNI, VtepMAC: mac}, nil
}

// parseCanonical decodes the exact form upstream (and MarshalJSON) writes,
// {"VNI":<n>,"VtepMAC":"<6-byte mac>"}, without encoding/json: thousands of
// peers are parsed on every full resync. It accepts raw only when
// re-encoding the result gives raw back byte for byte, so it never
// disagrees with the general path.
func parseCanonical(raw []byte) (BackendData, bool) {
	const pre, mid = `{"VNI":`, `,"VtepMAC":"`
	if !bytes.HasPrefix(raw, []byte(pre)) || !bytes.HasSuffix(raw, []byte(`"}`)) {
		return BackendData{}, false
	}
	rest := raw[len(pre) : len(raw)-2]
	i := bytes.Index(rest, []byte(mid))
	if i <= 0 || i > 8 {
		return BackendData{}, false
	}
	vni, err := strconv.Atoi(string(rest[:i]))
	if err != nil || vni < 0 {
		return BackendData{}, false
	}
	macStr := rest[i+len(mid):]
	if len(macStr) != 17 {
		return BackendData{}, false
	}
	mac, err := net.ParseMAC(string(macStr))
	if err != nil || checkMAC(mac) != nil {
		return BackendData{}, false
	}
	canon := pre + strconv.Itoa(vni) + mid + mac.String() + `"}`
	if canon != string(raw) {
		return BackendData{}, false
	}
	return BackendData{VNI: vni, VtepMAC: mac}, true
}
