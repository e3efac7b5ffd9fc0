package lease

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"reflect"
)

// ParseConfig parses net-conf.json (upstream flannel's network configuration)
// and returns a complete, valid Config with every default filled:
//
//   - EnableIPv4 true, EnableIPv6 and EnableNFTables false;
//   - SubnetLen 24 when Network is /22 or shorter, else Network's length + 2;
//     IPv6SubnetLen 64 when IPv6Network is /62 or shorter, else length + 2;
//   - SubnetMin the second subnet of the network, SubnetMax the last one
//     (and likewise for IPv6);
//   - Backend {"Type":"vxlan"} when absent, and BackendType "vxlan" when the
//     Backend object has no Type.
//
// Top-level keys match case-insensitively ("network" is Network), as
// upstream's decoder does; two spellings of one key are an error rather
// than a coin toss. Unknown keys are ignored, as upstream does. A null
// value counts as absent, and so does a SubnetLen or IPv6SubnetLen of 0 (as
// upstream). The keys of a disabled family are checked for type and syntax
// but otherwise ignored, and left zero in the Config.
//
// Every error is a *ConfigError wrapping ErrInvalidConfig that names the key
// and the value. Unlike upstream, a Network with host bits set is an error
// rather than silently masked.
func ParseConfig(data []byte) (Config, error) {
	trimmed := bytes.TrimLeft(data, " \t\r\n")
	if len(trimmed) == 0 || trimmed[0] != '{' {
		return Config{}, configErr("", "", "not a JSON object")
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(data, &raw); err != nil {
		e := configErr("", "", "malformed JSON")
		e.Err = err
		return Config{}, e
	}

	raw, err := canonicalKeys(raw)
	if err != nil {
		return Config{}, err
	}
	c := Config{EnableIPv4: true}
	if c.EnableIPv4, err = getBool(raw, "EnableIPv4", true); err != nil {
		return Config{}, err
	}
	if c.EnableIPv6, err = getBool(raw, "EnableIPv6", false); err != nil {
		return Config{}, err
	}
	if c.EnableNFTables, err = getBool(raw, "EnableNFTables", false); err != nil {
		return Config{}, err
	}

	v4, err := getFamily(raw, "", true)
	if err != nil {
		return Config{}, err
	}
	v6, err := getFamily(raw, "IPv6", false)
	if err != nil {
		return Config{}, err
	}
	if c.EnableIPv4 {
		c.Network, c.SubnetLen, c.SubnetMin, c.SubnetMax = v4.network, v4.subLen, v4.min, v4.max
	}
	if c.EnableIPv6 {
		c.IPv6Network, c.IPv6SubnetLen, c.IPv6SubnetMin, c.IPv6SubnetMax = v6.network, v6.subLen, v6.min, v6.max
	}

	if c.Backend, c.BackendType, err = getBackend(raw); err != nil {
		return Config{}, err
	}

	c = c.WithDefaults()
	if err := c.Validate(); err != nil {
		return Config{}, err
	}
	return c, nil
}

// UnmarshalJSON parses net-conf.json with ParseConfig. A JSON null leaves c
// unchanged.
func (c *Config) UnmarshalJSON(b []byte) error {
	if bytes.Equal(bytes.TrimSpace(b), []byte("null")) {
		return nil
	}
	v, err := ParseConfig(b)
	if err != nil {
		return err
	}
	*c = v
	return nil
}

// configWire is the net-conf.json shape MarshalJSON writes.
type configWire struct {
	Network        string `json:",omitempty"`
	SubnetLen      int    `json:",omitempty"`
	SubnetMin      string `json:",omitempty"`
	SubnetMax      string `json:",omitempty"`
	EnableIPv4     bool
	EnableIPv6     bool
	EnableNFTables bool            `json:",omitempty"`
	IPv6Network    string          `json:",omitempty"`
	IPv6SubnetLen  int             `json:",omitempty"`
	IPv6SubnetMin  string          `json:",omitempty"`
	IPv6SubnetMax  string          `json:",omitempty"`
	Backend        json.RawMessage `json:",omitempty"`
}

// MarshalJSON writes c as net-conf.json, every default spelled out, so that
// ParseConfig reads a valid Config back equal (see Equal). Zero fields are
// omitted; EnableIPv4 and EnableIPv6 are always written. A Config without
// a Backend object gets {"Type":BackendType}.
func (c Config) MarshalJSON() ([]byte, error) {
	w := configWire{
		EnableIPv4:     c.EnableIPv4,
		EnableIPv6:     c.EnableIPv6,
		EnableNFTables: c.EnableNFTables,
		SubnetLen:      c.SubnetLen,
		IPv6SubnetLen:  c.IPv6SubnetLen,
		Network:        prefixString(c.Network),
		SubnetMin:      addrString(c.SubnetMin),
		SubnetMax:      addrString(c.SubnetMax),
		IPv6Network:    prefixString(c.IPv6Network),
		IPv6SubnetMin:  addrString(c.IPv6SubnetMin),
		IPv6SubnetMax:  addrString(c.IPv6SubnetMax),
		Backend:        c.Backend,
	}
	if isNullOrEmpty(w.Backend) && c.BackendType != "" {
		b, err := json.Marshal(struct{ Type string }{c.BackendType})
		if err != nil {
			return nil, fmt.Errorf("network config Backend: %w", err)
		}
		w.Backend = b
	}
	// No HTML escaping, so that Backend bytes survive a round trip as given.
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(w); err != nil {
		return nil, fmt.Errorf("network config: %w", err)
	}
	return bytes.TrimRight(buf.Bytes(), "\n"), nil
}

// JSON returns c as net-conf.json (MarshalJSON), e.g. for a store to write.
func (c Config) JSON() ([]byte, error) { return c.MarshalJSON() }

// Equal reports whether two configs hold the same values, comparing the
// Backend objects by their decoded JSON value (so whitespace, escaping and
// key order do not matter).
func (c Config) Equal(o Config) bool {
	return c.EnableIPv4 == o.EnableIPv4 && c.EnableIPv6 == o.EnableIPv6 &&
		c.EnableNFTables == o.EnableNFTables &&
		c.Network == o.Network && c.SubnetLen == o.SubnetLen &&
		c.SubnetMin == o.SubnetMin && c.SubnetMax == o.SubnetMax &&
		c.IPv6Network == o.IPv6Network && c.IPv6SubnetLen == o.IPv6SubnetLen &&
		c.IPv6SubnetMin == o.IPv6SubnetMin && c.IPv6SubnetMax == o.IPv6SubnetMax &&
		c.BackendType == o.BackendType && jsonValueEqual(c.Backend, o.Backend)
}

func prefixString(p netip.Prefix) string {
	if !p.IsValid() {
		return ""
	}
	return p.String()
}

func addrString(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

// family holds one family's keys as parsed, before defaults.
type family struct {
	network  netip.Prefix
	subLen   int
	min, max netip.Addr
}

// getFamily parses Network/SubnetLen/SubnetMin/SubnetMax (prefix "") or
// their IPv6 counterparts (prefix "IPv6"): types, syntax and address family.
func getFamily(raw map[string]json.RawMessage, prefix string, is4 bool) (family, error) {
	var f family
	var err error
	if f.network, err = getPrefix(raw, prefix+"Network", is4); err != nil {
		return f, err
	}
	if f.subLen, err = getInt(raw, prefix+"SubnetLen"); err != nil {
		return f, err
	}
	if f.min, err = getAddr(raw, prefix+"SubnetMin", is4); err != nil {
		return f, err
	}
	if f.max, err = getAddr(raw, prefix+"SubnetMax", is4); err != nil {
		return f, err
	}
	return f, nil
}

func familyName(is4 bool) string {
	if is4 {
		return "IPv4"
	}
	return "IPv6"
}

func exampleCIDR(is4 bool) string {
	if is4 {
		return "10.244.0.0/16"
	}
	return "fd00:10:244::/56"
}

// checkAddrFamily refuses an address of the other family, an IPv4-mapped
// IPv6 address (lease keys cannot spell it) and a zone.
func checkAddrFamily(a netip.Addr, is4 bool) error {
	switch {
	case is4 && !a.Is4():
		return fmt.Errorf("not an IPv4 address")
	case !is4 && !a.Is6():
		return fmt.Errorf("not an IPv6 address")
	case !is4 && a.Is4In6():
		return fmt.Errorf("an IPv4-mapped address is not an IPv6 address here")
	case a.Zone() != "":
		return fmt.Errorf("an address with a zone is not allowed")
	}
	return nil
}

func checkPrefixFamily(p netip.Prefix, is4 bool) error {
	if err := checkAddrFamily(p.Addr(), is4); err != nil {
		return fmt.Errorf("%s network: %w", familyName(is4), err)
	}
	return nil
}

// getBackend returns the Backend object (compacted; nil when absent) and its
// Type ("" when absent).
func getBackend(raw map[string]json.RawMessage) (json.RawMessage, string, error) {
	v := lookup(raw, "Backend")
	if v == nil {
		return nil, "", nil
	}
	if v[0] != '{' {
		return nil, "", backendErr(v)
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(v, &obj); err != nil {
		return nil, "", backendErr(v)
	}
	typ, ok, err := getString(obj, "Type")
	if err != nil {
		return nil, "", configErr("Backend.Type", string(lookup(obj, "Type")), "want a string")
	}
	if ok && typ == "" {
		return nil, "", configErr("Backend.Type", `""`, "must not be empty")
	}
	compact, err := compactRaw(v)
	if err != nil {
		return nil, "", backendErr(v)
	}
	return compact, typ, nil
}

// jsonValueEqual reports whether a and b are the same JSON value; two
// invalid documents are equal only byte for byte.
func jsonValueEqual(a, b json.RawMessage) bool {
	if rawEqual(a, b) {
		return true
	}
	va, errA := decodeAny(a)
	vb, errB := decodeAny(b)
	return errA == nil && errB == nil && reflect.DeepEqual(va, vb)
}

func decodeAny(b json.RawMessage) (any, error) {
	if isNullOrEmpty(b) {
		return nil, nil
	}
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	var v any
	err := d.Decode(&v)
	return v, err
}

// backendErr reports a Backend that is not a JSON object. It names the kind
// of value rather than quoting it: Backend holds secrets (the ipsec PSK).
func backendErr(v []byte) *ConfigError {
	kind := "invalid JSON"
	if json.Valid(v) {
		switch v = bytes.TrimSpace(v); v[0] {
		case '"':
			kind = "a string"
		case '[':
			kind = "an array"
		case 't', 'f':
			kind = "a boolean"
		case 'n':
			kind = "null"
		case '{':
			kind = "an object" // unreachable: objects are accepted
		default:
			kind = "a number"
		}
	}
	return configErr("Backend", "", "want a JSON object, got "+kind)
}
