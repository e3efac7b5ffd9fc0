package lease

import (
	"errors"
	"math/rand/v2"
	"testing"
)

// FuzzParseConfig: ParseConfig never panics, fails only with a *ConfigError
// wrapping ErrInvalidConfig, and a Config it returns is valid, round-trips
// through its JSON, and can allocate a lease that CheckLease accepts.
func FuzzParseConfig(f *testing.F) {
	for _, name := range []string{"net-conf.vxlan.json", "net-conf.etcd.json", "net-conf.dualstack.json"} {
		f.Add(readSample(f, name))
	}
	for _, s := range []string{
		`{"Network":"10.0.0.0/28","SubnetLen":30}`,
		`{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"::/1","IPv6SubnetLen":64}`,
		`{"EnableIPv6":true,"Network":"0.0.0.0/0","IPv6Network":"fd00::/8","IPv6SubnetMin":"fd00:0:0:5::"}`,
		`{"Network":"10.0.0.0/16","Backend":{"Type":"ipsec","PSK":"<&>"}}`,
		`{"Network":"10.0.0.0/16","SubnetLen":"24"}`,
		`{"Network":"10.0.0.0/16"} x`,
		`null`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseConfig(data)
		if err != nil {
			var ce *ConfigError
			if !errors.Is(err, ErrInvalidConfig) || !errors.As(err, &ce) {
				t.Fatalf("error %v is not a *ConfigError wrapping ErrInvalidConfig", err)
			}
			return
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("parsed config does not validate: %v", err)
		}
		out, err := c.JSON()
		if err != nil {
			t.Fatalf("marshal: %v", err)
		}
		back, err := ParseConfig(out)
		if err != nil {
			t.Fatalf("reparse %s: %v", out, err)
		}
		if !c.Equal(back) {
			t.Fatalf("round trip changed the config:\n%+v\n%+v\n%s", c, back, out)
		}
		l, err := c.Allocate(nil, Lease{}, rand.New(rand.NewPCG(1, 2)))
		if err != nil {
			t.Fatalf("allocate from an empty network: %v", err)
		}
		if err := c.CheckLease(l); err != nil {
			t.Fatalf("allocated lease rejected: %v", err)
		}
	})
}
