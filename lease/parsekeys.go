package lease

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
	"strconv"
	"strings"
)

// canonicalKeys returns raw with each of net-conf.json's top-level keys
// spelled as upstream's Config fields are, whatever their case; other keys
// are kept as they are (and ignored).
func canonicalKeys(raw map[string]json.RawMessage) (map[string]json.RawMessage, error) {
	known := [...]string{
		"Network", "SubnetLen", "SubnetMin", "SubnetMax",
		"EnableIPv4", "EnableIPv6", "EnableNFTables",
		"IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax", "Backend",
	}
	out := make(map[string]json.RawMessage, len(raw))
	spelled := map[string]string{}
	for k, v := range raw {
		name := k
		for _, want := range known {
			if strings.EqualFold(k, want) {
				name = want
				break
			}
		}
		if other, dup := spelled[name]; dup {
			a, b := min(k, other), max(k, other)
			return nil, configErr(name, "", fmt.Sprintf("given twice, as %q and %q", a, b))
		}
		spelled[name] = k
		out[name] = v
	}
	return out, nil
}

// lookup returns the raw value of key, or nil when absent or null.
func lookup(raw map[string]json.RawMessage, key string) json.RawMessage {
	v, ok := raw[key]
	if !ok || isNullOrEmpty(v) {
		return nil
	}
	return bytes.TrimSpace(v)
}

func getBool(raw map[string]json.RawMessage, key string, def bool) (bool, error) {
	v := lookup(raw, key)
	switch string(v) {
	case "":
		return def, nil
	case "true":
		return true, nil
	case "false":
		return false, nil
	}
	return false, configErr(key, string(v), "want true or false")
}

func getInt(raw map[string]json.RawMessage, key string) (int, error) {
	v := lookup(raw, key)
	if v == nil {
		return 0, nil
	}
	// A JSON number written as a plain integer; 24.0 and 2.4e1 are refused,
	// as upstream's decoding into an unsigned integer does.
	if v[0] != '-' && (v[0] < '0' || v[0] > '9') {
		return 0, configErr(key, string(v), "want an integer")
	}
	n, err := strconv.Atoi(string(v))
	if err != nil {
		return 0, configErr(key, string(v), "want an integer")
	}
	return n, nil
}

func getString(raw map[string]json.RawMessage, key string) (string, bool, error) {
	v := lookup(raw, key)
	if v == nil {
		return "", false, nil
	}
	var s string
	if v[0] != '"' || json.Unmarshal(v, &s) != nil {
		return "", false, configErr(key, string(v), "want a string")
	}
	return s, true, nil
}

func getPrefix(raw map[string]json.RawMessage, key string, is4 bool) (netip.Prefix, error) {
	s, ok, err := getString(raw, key)
	if err != nil || !ok {
		return netip.Prefix{}, err
	}
	p, err := netip.ParsePrefix(s)
	if err != nil {
		return netip.Prefix{}, configErr(key, strconv.Quote(s), "want an "+familyName(is4)+" CIDR such as "+exampleCIDR(is4))
	}
	if err := checkPrefixFamily(p, is4); err != nil {
		return netip.Prefix{}, configErr(key, strconv.Quote(s), err.Error())
	}
	return p, nil
}

func getAddr(raw map[string]json.RawMessage, key string, is4 bool) (netip.Addr, error) {
	s, ok, err := getString(raw, key)
	if err != nil || !ok {
		return netip.Addr{}, err
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Addr{}, configErr(key, strconv.Quote(s), "want an "+familyName(is4)+" address")
	}
	if err := checkAddrFamily(a, is4); err != nil {
		return netip.Addr{}, configErr(key, strconv.Quote(s), err.Error())
	}
	return a, nil
}
