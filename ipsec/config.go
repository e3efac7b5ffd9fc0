package ipsec

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"strings"
	"time"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/lease"
)

// Type is the backend's name in net-conf.json.
const Type = "ipsec"

const (
	// MinPSKLen is the shortest PSK accepted, as upstream flannel requires.
	MinPSKLen = 96
	// DefaultRekeyInterval is Options.RekeyInterval when zero.
	DefaultRekeyInterval = time.Hour
	// DefaultReqid identifies our XFRM states and policies when
	// Options.Reqid is zero ("fl" in ASCII).
	DefaultReqid = 0x666c
	// DefaultRepairInterval is Options.RepairInterval when zero.
	DefaultRepairInterval = 10 * time.Second
	// UDPEncapPort is the port of ESP in UDP (RFC 3948).
	UDPEncapPort = 4500
)

// Cipher is an ESP AEAD transform. Its zero value means "not set"
// (Options.Cipher then defaults to AESGCM128); the only valid values are
// the constants below.
type Cipher uint8

// AES-GCM transforms (rfc4106) with a 16-byte ICV.
const (
	AESGCM128 Cipher = iota + 1
	AESGCM256
)

// Name is the kernel algorithm, "rfc4106(gcm(aes))"; "" for an invalid
// Cipher.
func (c Cipher) Name() string {
	if !c.valid() {
		return ""
	}
	return "rfc4106(gcm(aes))"
}

// KeyBits is the AES key length, 128 or 256; 0 for an invalid Cipher.
func (c Cipher) KeyBits() int {
	switch c {
	case AESGCM128:
		return 128
	case AESGCM256:
		return 256
	}
	return 0
}

// ICVBits is the integrity check value length in bits (128); 0 for an
// invalid Cipher.
func (c Cipher) ICVBits() int {
	if !c.valid() {
		return 0
	}
	return 128
}

func (c Cipher) valid() bool { return c == AESGCM128 || c == AESGCM256 }

// keyLen is the key material the kernel wants: the AES key and 4 bytes of
// salt (RFC 4106).
func (c Cipher) keyLen() int { return c.KeyBits()/8 + 4 }

// String names the transform, "rfc4106(gcm(aes))-128-icv128". It is part
// of the ESP key derivation (see the package doc): never change it.
func (c Cipher) String() string {
	if !c.valid() {
		return fmt.Sprintf("Cipher(%d)", uint8(c))
	}
	return fmt.Sprintf("%s-%d-icv%d", c.Name(), c.KeyBits(), c.ICVBits())
}

// ParseProposal maps an ESP proposal to a Cipher. It accepts upstream
// flannel's strongSwan proposal strings whose ESP part is AES-GCM with a
// 16-byte ICV ("aes128gcm16-sha256-prfsha256-ecp256", the upstream default,
// "aes256gcm16", "aes128gcm128"), and "rfc4106(gcm(aes))" with an optional
// key length ("rfc4106(gcm(aes))-256"). The parts after the first "-" of a
// strongSwan string name IKE algorithms, which have no meaning without IKE
// and are ignored. Anything else is an error naming the proposal.
func ParseProposal(s string) (Cipher, error) {
	p := strings.ToLower(strings.TrimSpace(s))
	if p == "" {
		return AESGCM128, nil
	}
	if rest, ok := strings.CutPrefix(p, "rfc4106(gcm(aes))"); ok {
		switch rest {
		case "", "-128":
			return AESGCM128, nil
		case "-256":
			return AESGCM256, nil
		}
		return 0, fmt.Errorf("ESP proposal %q: want rfc4106(gcm(aes)) with key length 128 or 256", s)
	}
	esp, _, _ := strings.Cut(p, "-")
	switch esp {
	case "aes128gcm16", "aes128gcm128", "aes128gcm":
		return AESGCM128, nil
	case "aes256gcm16", "aes256gcm128", "aes256gcm":
		return AESGCM256, nil
	}
	return 0, fmt.Errorf("ESP proposal %q: unsupported transform %q (supported: aes128gcm16, aes256gcm16, rfc4106(gcm(aes)))", s, esp)
}

// Options configure a Backend.
type Options struct {
	// PSK is the cluster secret, at least MinPSKLen bytes. Required. It
	// never appears in logs or errors.
	PSK []byte
	// Cipher is the ESP transform. Optional: AESGCM128.
	Cipher Cipher
	// UDPEncap carries ESP in UDP port 4500 (nodes behind NAT). Optional:
	// off.
	UDPEncap bool
	// RekeyInterval is how often Network.Run rekeys. Optional: 1h. A
	// rekeyed key is published through Options.Publish (or Env.Publish);
	// without either, keys change only when the agent restarts.
	RekeyInterval time.Duration
	// Publish is called by Network.Run after a rekey with the attributes
	// to publish with the lease (the new public key). Optional: default
	// flannel.Env.Publish, which the Agent sets.
	Publish func(lease.Attrs)
	// Grace is how long a key replaced by a rekey stays installed at
	// least (longer while peers still send with it, up to RekeyInterval);
	// outbound to a peer switches to the new key once the peer sends with
	// it, or after half of Grace when the peer does not send with the old
	// one either. Optional: 30s; at most half of RekeyInterval.
	Grace time.Duration
	// Reqid marks our XFRM states and policies. Optional: DefaultReqid.
	Reqid uint32
	// RepairInterval is how often Network.Run re-applies the last peer
	// set. Optional: 10s.
	RepairInterval time.Duration

	limits stateLimits // of outbound states (tests set low ones)
}

// DefaultGrace is Options.Grace when zero.
const DefaultGrace = 30 * time.Second

func (o Options) withDefaults() Options {
	if o.Cipher == 0 {
		o.Cipher = AESGCM128
	}
	if o.RekeyInterval <= 0 {
		o.RekeyInterval = DefaultRekeyInterval
	}
	if o.Grace <= 0 {
		o.Grace = DefaultGrace
	}
	if o.Grace >= o.RekeyInterval {
		// A key must be retired before the next rekey replaces its
		// successor.
		o.Grace = max(o.RekeyInterval/2, time.Millisecond)
	}
	if o.Reqid == 0 {
		o.Reqid = DefaultReqid
	}
	if o.RepairInterval <= 0 {
		o.RepairInterval = DefaultRepairInterval
	}
	o.limits = o.limits.withDefaults()
	return o
}

// validate checks the options; errors never quote the PSK.
func (o Options) validate() error {
	if len(o.PSK) == 0 {
		return fmt.Errorf("%w: Backend.PSK: missing (the ipsec backend needs a cluster secret of at least %d characters)", lease.ErrInvalidConfig, MinPSKLen)
	}
	if len(o.PSK) < MinPSKLen {
		return fmt.Errorf("%w: Backend.PSK: too short (%d characters, want at least %d)", lease.ErrInvalidConfig, len(o.PSK), MinPSKLen)
	}
	if !o.Cipher.valid() {
		return fmt.Errorf("%w: cipher %s: unsupported", lease.ErrInvalidConfig, o.Cipher)
	}
	return nil
}

// configWire is the "Backend" object of net-conf.json for ipsec.
type configWire struct {
	Type          string
	PSK           *string
	UDPEncap      *bool
	ESPProposal   *string
	RekeyInterval json.RawMessage
}

// ParseConfig reads the ipsec keys of the "Backend" object: PSK (required),
// UDPEncap, ESPProposal and RekeyInterval (seconds as a number, or a Go
// duration string such as "30m"; 1s to MaxRekeyInterval). Keys are
// case-insensitive and each may appear once. Errors wrap lease.ErrInvalidConfig, name
// the key and never quote the PSK.
func ParseConfig(raw json.RawMessage) (Options, error) {
	var o Options
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return o, Options{}.withDefaults().validate()
	}
	keys, err := objectKeys(raw)
	if err != nil {
		return o, err
	}
	var w configWire
	for _, kv := range keys {
		k, v := kv.key, kv.value
		var err error
		switch strings.ToLower(k) {
		case "type":
			err = json.Unmarshal(v, &w.Type)
		case "psk":
			err = json.Unmarshal(v, &w.PSK)
			if err != nil {
				return o, fmt.Errorf("%w: Backend.PSK: want a string", lease.ErrInvalidConfig)
			}
		case "udpencap":
			err = json.Unmarshal(v, &w.UDPEncap)
		case "espproposal":
			err = json.Unmarshal(v, &w.ESPProposal)
		case "rekeyinterval":
			w.RekeyInterval = v
		default:
			return o, fmt.Errorf("%w: Backend.%s: unknown key for the %s backend (want PSK, UDPEncap, ESPProposal, RekeyInterval)", lease.ErrInvalidConfig, k, Type)
		}
		if err != nil {
			return o, fmt.Errorf("%w: Backend.%s %s: %v", lease.ErrInvalidConfig, k, v, err)
		}
	}
	if w.Type != "" && w.Type != Type {
		return o, fmt.Errorf("%w: Backend.Type %q is not %q", lease.ErrInvalidConfig, w.Type, Type)
	}
	if w.PSK != nil {
		o.PSK = []byte(*w.PSK)
	}
	if w.UDPEncap != nil {
		o.UDPEncap = *w.UDPEncap
	}
	if w.ESPProposal != nil {
		c, err := ParseProposal(*w.ESPProposal)
		if err != nil {
			return o, fmt.Errorf("%w: Backend.ESPProposal: %v", lease.ErrInvalidConfig, err)
		}
		o.Cipher = c
	}
	if len(w.RekeyInterval) > 0 && !bytes.Equal(w.RekeyInterval, []byte("null")) {
		d, err := parseInterval(w.RekeyInterval)
		if err != nil {
			return o, fmt.Errorf("%w: Backend.RekeyInterval %s: %v", lease.ErrInvalidConfig, w.RekeyInterval, err)
		}
		o.RekeyInterval = d
	}
	if err := o.withDefaults().validate(); err != nil {
		return o, err
	}
	return o, nil
}

// MaxRekeyInterval is the longest RekeyInterval accepted.
const MaxRekeyInterval = 30 * 24 * time.Hour

// keyValue is one member of a JSON object.
type keyValue struct {
	key   string
	value json.RawMessage
}

// objectKeys returns the members of the JSON object raw in order. A key
// given twice, also in another case ("PSK" and "psk": the keys are
// case-insensitive), is an error naming both.
func objectKeys(raw json.RawMessage) ([]keyValue, error) {
	notObject := fmt.Errorf("%w: Backend: not a JSON object", lease.ErrInvalidConfig)
	var all map[string]json.RawMessage
	if json.Unmarshal(raw, &all) != nil {
		return nil, notObject
	}
	d := json.NewDecoder(bytes.NewReader(raw))
	if t, err := d.Token(); err != nil || t != json.Delim('{') {
		return nil, notObject
	}
	var out []keyValue
	seen := map[string]string{}
	for d.More() {
		t, err := d.Token()
		k, ok := t.(string)
		if err != nil || !ok {
			return nil, notObject
		}
		var v json.RawMessage
		if err := d.Decode(&v); err != nil {
			return nil, notObject
		}
		if first, dup := seen[strings.ToLower(k)]; dup {
			return nil, fmt.Errorf("%w: Backend.%s and Backend.%s: the same key twice (keys are case-insensitive)", lease.ErrInvalidConfig, first, k)
		}
		seen[strings.ToLower(k)] = k
		out = append(out, keyValue{k, v})
	}
	return out, nil
}

func parseInterval(raw json.RawMessage) (time.Duration, error) {
	tooLong := fmt.Errorf("want at most %v", MaxRekeyInterval)
	var secs float64
	if err := json.Unmarshal(raw, &secs); err == nil {
		if secs < 1 {
			return 0, fmt.Errorf("want at least 1 second")
		}
		if secs > MaxRekeyInterval.Seconds() {
			return 0, tooLong
		}
		return time.Duration(secs * float64(time.Second)), nil
	}
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return 0, fmt.Errorf("want seconds or a duration string like \"30m\"")
	}
	d, err := time.ParseDuration(s)
	if err != nil {
		return 0, fmt.Errorf("want seconds or a duration string like \"30m\"")
	}
	if d < time.Second {
		return 0, fmt.Errorf("want at least 1s")
	}
	if d > MaxRekeyInterval {
		return 0, tooLong
	}
	return d, nil
}

// FromConfig builds an ipsec backend from the network configuration, for a
// backend.Registry.
func FromConfig(cfg lease.Config) (flannel.Backend, error) {
	if cfg.BackendType != "" && cfg.BackendType != Type {
		return nil, fmt.Errorf("%w: Backend.Type %q is not %q", lease.ErrInvalidConfig, cfg.BackendType, Type)
	}
	o, err := ParseConfig(cfg.Backend)
	if err != nil {
		return nil, err
	}
	return New(o)
}

// String describes the options without the PSK.
func (o Options) String() string {
	return fmt.Sprintf("ipsec.Options{PSK:<redacted %d bytes> Cipher:%s UDPEncap:%t RekeyInterval:%v Grace:%v Reqid:%#x RepairInterval:%v}",
		len(o.PSK), o.Cipher, o.UDPEncap, o.RekeyInterval, o.Grace, o.Reqid, o.RepairInterval)
}

// GoString is String, so %#v does not print the PSK either.
func (o Options) GoString() string { return o.String() }

// LogValue keeps the PSK out of slog output.
func (o Options) LogValue() slog.Value { return slog.StringValue(o.String()) }
