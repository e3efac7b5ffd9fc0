package daemon

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"

	"github.com/flannelkit/flannel/lease"
)

// ErrNoBrNetfilter marks a node whose kernel has not loaded br_netfilter.
var ErrNoBrNetfilter = errors.New("br_netfilter is not loaded")

// checkBrNetfilter checks, as upstream does at start, that the bridge
// netfilter sysctls of each family cfg enables exist under procSys
// (normally /proc/sys): without br_netfilter, traffic between pods on one
// node's bridge skips iptables, so kube-proxy's Service rules miss it.
// With EnableNFTables nothing is checked, as upstream.
func checkBrNetfilter(cfg lease.Config, procSys string) error {
	if cfg.EnableNFTables {
		return nil
	}
	for _, f := range []struct {
		on   bool
		name string
	}{{cfg.EnableIPv4, "bridge-nf-call-iptables"}, {cfg.EnableIPv6, "bridge-nf-call-ip6tables"}} {
		if !f.on {
			continue
		}
		p := filepath.Join(procSys, "net", "bridge", f.name)
		if _, err := os.Stat(p); errors.Is(err, fs.ErrNotExist) {
			return fmt.Errorf("%w: %s does not exist; load it with `modprobe br_netfilter` "+
				"(and list it in /etc/modules-load.d/ to survive reboots)", ErrNoBrNetfilter, p)
		} else if err != nil {
			return fmt.Errorf("check br_netfilter: %w", err)
		}
	}
	return nil
}
