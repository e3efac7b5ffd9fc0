package lease

import (
	"encoding/json"
	"regexp"
	"slices"
	"testing"
)

// keyRE is the lease key's grammar, the oracle of splitKey.
var keyRE = regexp.MustCompile(`^(\d+\.\d+\.\d+\.\d+)-(\d+)(?:&([a-fA-F\d:]+)-(\d+))?$`)

// FuzzParseKey: ParseKey never panics; a key it accepts names masked
// prefixes of the right families, and Key writes it back so that it parses
// to the same subnets.
func FuzzParseKey(f *testing.F) {
	for _, s := range []string{
		"10.244.3.0-24", "10.244.3.0-24&fd00:10:244:3::-64", "0.0.0.0-0&FD00::-64",
		"0.0.0.0-0", "10.244.3.1-24", "10.244.3.0-33", "172.0.0.0-8", "1.2.3.4-08&::-0", "",
		"1.2.3-24", "1.2.3.4.5-24", "1..3.4-24", "1.2.3.4-", "1.2.3.4-24&", "1.2.3.4-24&::-", "1.2.3.4-24&-64",
		"1.2.3.4-24&fd00::-64-1", "1.2.3.4-24&fd00::-64&::-1", "1.2.3.4-2a", "1.2.3.4-24&fd00::1%eth0-128", "١.2.3.4-24",
	} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, key string) {
		a4, l4, a6, l6, ok := splitKey(key)
		if m := keyRE.FindStringSubmatch(key); (m != nil) != ok || (ok && !slices.Equal(m[1:], []string{a4, l4, a6, l6})) {
			t.Fatalf("%q: splitKey says %q %q %q %q %v, the grammar %q", key, a4, l4, a6, l6, ok, m)
		}
		v4, v6, err := ParseKey(key)
		if err != nil {
			return
		}
		if !v4.IsValid() && !v6.IsValid() {
			t.Fatalf("%q: accepted without a subnet", key)
		}
		if v4.IsValid() && (!v4.Addr().Is4() || v4.Masked() != v4) {
			t.Fatalf("%q: bad IPv4 part %s", key, v4)
		}
		if v6.IsValid() && (!v6.Addr().Is6() || v6.Addr().Is4In6() || v6.Masked() != v6 || v6.Addr().Zone() != "") {
			t.Fatalf("%q: bad IPv6 part %s", key, v6)
		}
		back := Lease{Subnet: v4, IPv6Subnet: v6}.Key()
		b4, b6, err := ParseKey(back)
		if err != nil || b4 != v4 || b6 != v6 {
			t.Fatalf("%q: Key wrote %q, which parses to %s %s (%v)", key, back, b4, b6, err)
		}
	})
}

// FuzzAttrsJSON: reading lease attributes never panics, and attributes it
// accepts are written in upstream's format and read back equal.
func FuzzAttrsJSON(f *testing.F) {
	for _, s := range []string{
		`{"PublicIP":"192.168.1.11","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"7a:1e:6c:d2:4a:09"}}`,
		`{"PublicIP":"0.0.0.0","PublicIPv6":"fd00::11","BackendType":"host-gw"}`,
		`{"PublicIP":"10.0.0.1","BackendType":"ipsec","BackendData":{"PublicKey":"x"},"BackendV6Data":null}`,
		`{"PublicIP":"::1"}`, `{"PublicIPv6":"fe80::1%eth0"}`, `[]`, `null`, `{"BackendData":"x"}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var a Attrs
		if err := json.Unmarshal(data, &a); err != nil {
			return
		}
		out, err := json.Marshal(a)
		if err != nil {
			t.Fatalf("%s: read, but cannot be written: %v", data, err)
		}
		var back Attrs
		if err := json.Unmarshal(out, &back); err != nil {
			t.Fatalf("%s: written as %s, which does not read back: %v", data, out, err)
		}
		if !a.Equal(back) {
			t.Fatalf("%s: round trip through %s changed %+v to %+v", data, out, a, back)
		}
	})
}
