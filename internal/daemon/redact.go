package daemon

import (
	"fmt"
	"log/slog"

	"github.com/flannelkit/flannel/lease"
)

// redacted returns the Config with its secret (the etcd password) replaced.
func (c Config) redacted() redactedConfig {
	if c.EtcdPassword != "" {
		c.EtcdPassword = lease.Redacted
	}
	return redactedConfig(c)
}

// redactedConfig is Config without the methods below, so that formatting
// it does not recurse.
type redactedConfig Config

// LogValue logs the Config with the etcd password redacted.
func (c Config) LogValue() slog.Value {
	return slog.AnyValue(c.redacted())
}

// String prints the Config with the etcd password redacted, so that %v
// and %+v never show it.
func (c Config) String() string { return fmt.Sprintf("%+v", c.redacted()) }

// GoString is String, for %#v.
func (c Config) GoString() string { return "daemon.Config" + c.String() }
