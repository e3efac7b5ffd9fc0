package daemon

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/flannelkit/flannel/lease"
)

func TestCheckBrNetfilter(t *testing.T) {
	t.Parallel()
	parse := func(s string) lease.Config {
		c, err := lease.ParseConfig([]byte(s))
		require.NoError(t, err)
		return c
	}
	v4 := parse(`{"Network":"10.244.0.0/16"}`)
	dual := parse(`{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00::/48"}`)
	nft := parse(`{"Network":"10.244.0.0/16","EnableNFTables":true}`)

	empty := t.TempDir()
	v4only := t.TempDir()
	require.NoError(t, os.MkdirAll(filepath.Join(v4only, "net", "bridge"), 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(v4only, "net", "bridge", "bridge-nf-call-iptables"), []byte("1\n"), 0o644))

	err := checkBrNetfilter(v4, empty)
	require.ErrorIs(t, err, ErrNoBrNetfilter)
	assert.Contains(t, err.Error(), filepath.Join(empty, "net/bridge/bridge-nf-call-iptables")+" does not exist; load it with `modprobe br_netfilter`")
	assert.NoError(t, checkBrNetfilter(v4, v4only))
	err = checkBrNetfilter(dual, v4only)
	require.ErrorIs(t, err, ErrNoBrNetfilter)
	assert.Contains(t, err.Error(), "bridge-nf-call-ip6tables")
	assert.NoError(t, checkBrNetfilter(nft, empty), "nftables mode checks nothing, as upstream")
	// This machine's kernel has it (the daemon tests need it).
	assert.NoError(t, checkBrNetfilter(dual, "/proc/sys"))
}
