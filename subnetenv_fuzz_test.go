package flannel_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/flannelkit/flannel"
)

// FuzzReadSubnetEnv: reading subnet.env never panics; what ReadSubnetEnv
// accepts has subnets of the right families, and what ReadCompleteSubnetEnv
// accepts is written back by WriteSubnetEnv and read back equal.
func FuzzReadSubnetEnv(f *testing.F) {
	for _, s := range []string{
		"FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n",
		"FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:3::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n",
		"export FLANNEL_SUBNET='10.1.2.1/24'\n# comment\nFLANNEL_MTU=\"9000\"\n",
		"FLANNEL_SUBNET=::ffff:10.0.0.1/120\n", "FLANNEL_MTU=-1\n", "\x00=\n=\n",
	} {
		f.Add([]byte(s))
	}
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		in := filepath.Join(dir, "in.env")
		if err := os.WriteFile(in, data, 0o644); err != nil {
			t.Fatal(err)
		}
		if e, err := flannel.ReadSubnetEnv(in); err == nil {
			if e.Subnet.IsValid() && !e.Subnet.Addr().Is4() || e.IPv6Subnet.IsValid() && !e.IPv6Subnet.Addr().Is6() {
				t.Fatalf("%q: subnets of the wrong family: %+v", data, e)
			}
		}
		e, err := flannel.ReadCompleteSubnetEnv(in)
		if err != nil {
			return
		}
		out := filepath.Join(dir, "out.env")
		if err := flannel.WriteSubnetEnv(out, e); err != nil {
			t.Fatalf("%q: read as %+v, which cannot be written: %v", data, e, err)
		}
		back, err := flannel.ReadCompleteSubnetEnv(out)
		if err != nil || back != e {
			t.Fatalf("%q: round trip changed %+v to %+v (%v)", data, e, back, err)
		}
	})
}
