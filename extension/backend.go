package extension

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"path/filepath"
	"slices"
	"strings"
	"sync"

	"github.com/vishvananda/netns"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/lease"
)

// Backend is the extension flannel.Backend. Prepare must be called before
// Start; a Backend may be prepared and started again. It is safe for
// concurrent use.
type Backend struct {
	opts Options

	mu       sync.Mutex
	env      flannel.Env
	prepared bool
}

var _ flannel.Backend = (*Backend)(nil)

// New returns an extension backend running opts.Commands.
func New(opts Options) *Backend { return &Backend{opts: opts.withDefaults()} }

// Type returns "extension".
func (b *Backend) Type() string { return Type }

// nsOpen reports whether ns is a namespace handle: open, and not the zero
// value of a flannel.Env (descriptor 0 is standard input).
func nsOpen(ns netns.NsHandle) bool { return ns.IsOpen() && ns != 0 }

func (b *Backend) state() stateFile {
	if b.opts.StateDir == "" {
		return stateFile{}
	}
	return stateFile{path: filepath.Join(b.opts.StateDir, StateFile)}
}

func (b *Backend) runner(env flannel.Env) *runner {
	return &runner{ns: env.NS, environ: b.opts.Environ, timeout: b.opts.CommandTimeout, log: backend.Logger(env.Logger)}
}

// Prepare checks the environment (an open env.NS when any command is
// configured: commands run there), completes the external interface
// through env.Handle when one is given, runs PreStartupCommand and returns
// the attributes to publish: BackendType "extension", the public addresses,
// and the command's trimmed standard output as a JSON string in
// BackendData (none without the command). A failing command fails Prepare.
// It may be called again, and runs the command again then.
func (b *Backend) Prepare(ctx context.Context, env flannel.Env) (lease.Attrs, error) {
	c := b.opts.Commands
	if (c.PreStartup != "" || c.PostStartup != "" || c.SubnetAdd != "" || c.SubnetRemove != "") && !nsOpen(env.NS) {
		return lease.Attrs{}, errors.New("extension: prepare: no network namespace (Env.NS): the commands run in the node's namespace")
	}
	if env.Handle != nil {
		iface, err := backend.BindInterface(env.Handle, env.Iface, env.Config)
		if err != nil {
			return lease.Attrs{}, fmt.Errorf("extension: prepare: %w", err)
		}
		env.Iface = iface
	}
	attrs := lease.Attrs{BackendType: Type, PublicIP: env.Iface.PublicIP, PublicIPv6: env.Iface.PublicIPv6}
	if c.PreStartup != "" {
		log := backend.Logger(env.Logger).With("backend", Type)
		res, err := b.runner(env).run(ctx, "PreStartupCommand", c.PreStartup, nil, "", log)
		if err != nil {
			return lease.Attrs{}, fmt.Errorf("extension: prepare: %w", err)
		}
		data, err := json.Marshal(strings.TrimSpace(res.stdout))
		if err != nil {
			return lease.Attrs{}, fmt.Errorf("extension: prepare: %w", err)
		}
		attrs.BackendData = data
	}
	b.mu.Lock()
	b.env, b.prepared = env, true
	b.mu.Unlock()
	return attrs, nil
}

// Start runs PostStartupCommand with this node's lease in its environment
// and returns the Network for own, which runs no peer command before the
// first Apply. It fails when Prepare was not called, own has no subnet, the
// command fails or the state file cannot be read.
func (b *Backend) Start(ctx context.Context, own lease.Lease) (flannel.Network, error) {
	b.mu.Lock()
	env, ok := b.env, b.prepared
	b.mu.Unlock()
	if !ok {
		return nil, errors.New("extension: start: Prepare was not called")
	}
	if !own.Subnet.IsValid() && !own.IPv6Subnet.IsValid() {
		return nil, errors.New("extension: start: lease has no subnet")
	}
	added, err := b.state().load()
	if err != nil {
		return nil, fmt.Errorf("extension: start: %w", err)
	}
	log := backend.Logger(env.Logger).With("backend", Type)
	if b.opts.StateDir == "" {
		log.Warn("no state directory: peers removed while the agent is down will not get their remove command")
	}
	if line := b.opts.Commands.PostStartup; line != "" {
		vars := []string{
			"NETWORK=" + str(env.Config.Network), "IPV6NETWORK=" + str(env.Config.IPv6Network),
			"SUBNET=" + str(own.Subnet), "IPV6SUBNET=" + str(own.IPv6Subnet),
			"PUBLIC_IP=" + str(own.Attrs.PublicIP), "PUBLIC_IPV6=" + str(own.Attrs.PublicIPv6),
		}
		if _, err := b.runner(env).run(ctx, "PostStartupCommand", line, vars, "", log); err != nil {
			return nil, fmt.Errorf("extension: start: %w", err)
		}
	}
	return newNetwork(b, env, own, added), nil
}

// Cleanup runs SubnetRemoveCommand for every peer in the state file and
// then deletes the file. A peer whose command fails stays recorded (the
// error holds a *flannel.PeerError for it) so that Cleanup can be called
// again; without a state file there is nothing to do.
func (b *Backend) Cleanup(ctx context.Context, env flannel.Env) error {
	st := b.state()
	added, err := st.load()
	if err != nil {
		return fmt.Errorf("extension: cleanup: %w", err)
	}
	if len(added) == 0 {
		return st.remove()
	}
	log := backend.Logger(env.Logger).With("backend", Type)
	r := b.runner(env)
	var errs []error
	for _, k := range slices.Sorted(maps.Keys(added)) {
		p := added[k]
		if line := b.opts.Commands.SubnetRemove; line != "" {
			if _, err := r.run(ctx, "SubnetRemoveCommand", line, p.vars(), p.Data, log.With("subnet", k)); err != nil {
				errs = append(errs, &flannel.PeerError{Lease: p.lease(), Err: err})
				continue
			}
		}
		delete(added, k)
	}
	if len(added) == 0 {
		return errors.Join(append(errs, st.remove())...)
	}
	return errors.Join(append(errs, st.save(added))...)
}
