package nlsafe

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestSysctlPath(t *testing.T) {
	tests := []struct{ in, want, err string }{
		{in: "net.ipv4.ip_forward", want: "/proc/sys/net/ipv4/ip_forward"},
		{in: "net/ipv4/conf/eth0.100/rp_filter", want: "/proc/sys/net/ipv4/conf/eth0.100/rp_filter"},
		{in: "/proc/sys/net/ipv6/conf/all/forwarding", want: "/proc/sys/net/ipv6/conf/all/forwarding"},
		{in: "../../etc/passwd", err: "not under /proc/sys"},
		{in: "/proc/sys/../../etc/passwd", err: "not under /proc/sys"},
	}
	for _, tc := range tests {
		t.Run(tc.in, func(t *testing.T) {
			got, err := sysctlPath(tc.in)
			if tc.err != "" {
				assert.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}
