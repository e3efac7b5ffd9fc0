package extension

import (
	"bytes"
	"encoding/json"
	"fmt"
	"strings"
	"time"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/lease"
)

// Type is the backend's name in net-conf.json.
const Type = "extension"

// Defaults of Options.
const (
	DefaultCommandTimeout = 30 * time.Second
	DefaultRetryMin       = time.Second
	DefaultRetryMax       = 2 * time.Minute
	DefaultRepairInterval = 10 * time.Second
	DefaultParallel       = 8
	// DefaultPath is the PATH of the commands when Options.Environ sets
	// none.
	DefaultPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
	// StateFile is the name of the state file in Options.StateDir.
	StateFile = "extension-peers.json"
)

// Commands are the net-conf.json settings: the command lines to run. An
// empty one is not run.
type Commands struct {
	PreStartup   string
	PostStartup  string
	SubnetAdd    string
	SubnetRemove string
}

// Options configure a Backend.
type Options struct {
	// Commands to run. Optional: none runs nothing (a lease-only node).
	Commands Commands
	// StateDir is where the set of added peers is kept (file StateFile),
	// so that peers removed while the agent was down get their remove
	// command on the next start. A tmpfs such as /run/flannel fits: after
	// a reboot whatever the add commands did is gone too, and every peer
	// is added again. Optional: empty keeps the set in memory only, and a
	// restarted agent runs add again for every peer and never remove for
	// peers that left while it was down.
	StateDir string
	// Environ is the base environment of every command ("KEY=value"), to
	// which the command's variables are added. Optional: only
	// PATH=DefaultPath. Embedders that want the process's environment
	// pass os.Environ().
	Environ []string
	// CommandTimeout bounds every command run. Optional: 30s.
	CommandTimeout time.Duration
	// RetryMin and RetryMax bound the backoff between attempts for a peer
	// whose command failed. Optional: 1s and 2m.
	RetryMin, RetryMax time.Duration
	// RepairInterval is how often Run re-applies the last peer set.
	// Optional: 10s.
	RepairInterval time.Duration
	// Parallel is how many peers' commands run at once. Optional: 8.
	Parallel int
}

func (o Options) withDefaults() Options {
	if o.CommandTimeout <= 0 {
		o.CommandTimeout = DefaultCommandTimeout
	}
	if o.RetryMin <= 0 {
		o.RetryMin = DefaultRetryMin
	}
	if o.RetryMax < o.RetryMin {
		o.RetryMax = max(DefaultRetryMax, o.RetryMin)
	}
	if o.RepairInterval <= 0 {
		o.RepairInterval = DefaultRepairInterval
	}
	if o.Parallel <= 0 {
		o.Parallel = DefaultParallel
	}
	hasPath := false
	for _, e := range o.Environ {
		hasPath = hasPath || strings.HasPrefix(e, "PATH=")
	}
	if !hasPath {
		o.Environ = append(append([]string(nil), o.Environ...), "PATH="+DefaultPath)
	}
	return o
}

// ParseCommands decodes the "Backend" object of net-conf.json. Keys match
// case-insensitively, as encoding/json (and so upstream) does; an unknown
// key or a value that is not a string is an error wrapping
// lease.ErrInvalidConfig that names the key.
func ParseCommands(raw json.RawMessage) (Commands, error) {
	var c Commands
	raw = bytes.TrimSpace(raw)
	if len(raw) == 0 || bytes.Equal(raw, []byte("null")) {
		return c, nil
	}
	var keys map[string]json.RawMessage
	if err := json.Unmarshal(raw, &keys); err != nil {
		return c, fmt.Errorf("%w: Backend: %v", lease.ErrInvalidConfig, err)
	}
	fields := map[string]*string{
		"PreStartupCommand":   &c.PreStartup,
		"PostStartupCommand":  &c.PostStartup,
		"SubnetAddCommand":    &c.SubnetAdd,
		"SubnetRemoveCommand": &c.SubnetRemove,
	}
	for k, v := range keys {
		if strings.EqualFold(k, "Type") {
			continue
		}
		var dst *string
		for name, f := range fields {
			if strings.EqualFold(k, name) {
				dst = f
			}
		}
		if dst == nil {
			return c, fmt.Errorf("%w: Backend.%s: unknown key for the %s backend (it has PreStartupCommand, PostStartupCommand, SubnetAddCommand, SubnetRemoveCommand)",
				lease.ErrInvalidConfig, k, Type)
		}
		if err := json.Unmarshal(v, dst); err != nil {
			return c, fmt.Errorf("%w: Backend.%s: not a string: %v", lease.ErrInvalidConfig, k, err)
		}
	}
	return c, nil
}

// Constructor returns a backend.Constructor that builds an extension
// backend with opts and the commands of the network configuration.
func Constructor(opts Options) backend.Constructor {
	return func(cfg lease.Config) (flannel.Backend, error) {
		if cfg.BackendType != "" && cfg.BackendType != Type {
			return nil, fmt.Errorf("%w: Backend.Type %q is not %q", lease.ErrInvalidConfig, cfg.BackendType, Type)
		}
		cmds, err := ParseCommands(cfg.Backend)
		if err != nil {
			return nil, err
		}
		opts.Commands = cmds
		return New(opts), nil
	}
}

// FromConfig builds an extension backend from the network configuration
// with the default Options, so without a state directory (see
// Options.StateDir); a program that persists the added peers registers
// Constructor(Options{StateDir: ...}) instead.
func FromConfig(cfg lease.Config) (flannel.Backend, error) {
	return Constructor(Options{})(cfg)
}
