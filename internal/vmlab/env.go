package vmlab

import (
	"log/slog"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/internal/netlab"
	"github.com/flannelkit/flannel/lease"
)

// NodeEnv is the backend environment of lab node n for cfg: its underlay
// interface and addresses (public = own), its handle and namespace, and
// logger.
func NodeEnv(n *netlab.Node, cfg lease.Config, logger *slog.Logger) flannel.Env {
	return flannel.Env{
		Config: cfg,
		Iface:  flannel.ExternalInterface{Name: n.Iface, IP: n.IP, PublicIP: n.IP, IPv6: n.IPv6, PublicIPv6: n.IPv6},
		Handle: n.Handle,
		NS:     n.NS,
		Logger: logger,
	}
}
