package lease

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net/netip"
)

// attrsWire is the JSON shape upstream flannel writes: PublicIP always (as
// "0.0.0.0" for an IPv6-only node), PublicIPv6 as a string or null, the
// backend fields omitted when empty.
type attrsWire struct {
	PublicIP      string
	PublicIPv6    *string
	BackendType   string          `json:",omitempty"`
	BackendData   json.RawMessage `json:",omitempty"`
	BackendV6Data json.RawMessage `json:",omitempty"`
}

// MarshalJSON writes the attributes in upstream flannel's etcd value format,
// e.g. {"PublicIP":"192.168.1.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:09"}}.
func (a Attrs) MarshalJSON() ([]byte, error) {
	w := attrsWire{PublicIP: "0.0.0.0", BackendType: a.BackendType}
	if a.PublicIP.IsValid() {
		if !a.PublicIP.Is4() {
			return nil, fmt.Errorf("PublicIP %s is not an IPv4 address", a.PublicIP)
		}
		w.PublicIP = a.PublicIP.String()
	}
	if a.PublicIPv6.IsValid() {
		if !a.PublicIPv6.Is6() || a.PublicIPv6.Is4In6() {
			return nil, fmt.Errorf("PublicIPv6 %s is not an IPv6 address", a.PublicIPv6)
		}
		s := a.PublicIPv6.String()
		w.PublicIPv6 = &s
	}
	var err error
	if w.BackendData, err = compactRaw(a.BackendData); err != nil {
		return nil, fmt.Errorf("BackendData: %w", err)
	}
	if w.BackendV6Data, err = compactRaw(a.BackendV6Data); err != nil {
		return nil, fmt.Errorf("BackendV6Data: %w", err)
	}
	return json.Marshal(w)
}

// UnmarshalJSON reads upstream's format. A missing or null PublicIPv6 and a
// PublicIP of "0.0.0.0" mean absent. Errors name the field.
func (a *Attrs) UnmarshalJSON(b []byte) error {
	var w attrsWire
	if err := json.Unmarshal(b, &w); err != nil {
		return fmt.Errorf("lease attributes: %w", err)
	}
	out := Attrs{BackendType: w.BackendType}
	if w.PublicIP != "" {
		ip, err := netip.ParseAddr(w.PublicIP)
		if err != nil || !ip.Is4() {
			return fmt.Errorf("lease attributes: PublicIP %q is not an IPv4 address", w.PublicIP)
		}
		if !ip.IsUnspecified() {
			out.PublicIP = ip
		}
	}
	if w.PublicIPv6 != nil && *w.PublicIPv6 != "" {
		ip, err := netip.ParseAddr(*w.PublicIPv6)
		if err != nil || !ip.Is6() || ip.Is4In6() {
			return fmt.Errorf("lease attributes: PublicIPv6 %q is not an IPv6 address", *w.PublicIPv6)
		}
		if !ip.IsUnspecified() {
			out.PublicIPv6 = ip
		}
	}
	if !isNullOrEmpty(w.BackendData) {
		out.BackendData = append(json.RawMessage(nil), w.BackendData...)
	}
	if !isNullOrEmpty(w.BackendV6Data) {
		out.BackendV6Data = append(json.RawMessage(nil), w.BackendV6Data...)
	}
	*a = out
	return nil
}

// Equal reports whether two attribute sets carry the same values, backend
// data compared as JSON values: json.Marshal escapes & < > in what it
// writes (as upstream's does), so stored data may differ byte for byte from
// what a backend published and still be the same.
func (a Attrs) Equal(o Attrs) bool {
	return a.PublicIP == o.PublicIP && a.PublicIPv6 == o.PublicIPv6 &&
		a.BackendType == o.BackendType &&
		jsonValueEqual(a.BackendData, o.BackendData) && jsonValueEqual(a.BackendV6Data, o.BackendV6Data)
}

func isNullOrEmpty(b json.RawMessage) bool {
	t := bytes.TrimSpace(b)
	return len(t) == 0 || bytes.Equal(t, []byte("null"))
}

func compactRaw(b json.RawMessage) (json.RawMessage, error) {
	if isNullOrEmpty(b) {
		return nil, nil
	}
	var buf bytes.Buffer
	if err := json.Compact(&buf, b); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func rawEqual(a, b json.RawMessage) bool {
	if bytes.Equal(a, b) { // the common case, without compacting both
		return true
	}
	ca, errA := compactRaw(a)
	cb, errB := compactRaw(b)
	if errA != nil || errB != nil {
		return bytes.Equal(a, b)
	}
	return bytes.Equal(ca, cb)
}
