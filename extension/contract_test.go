package extension_test

import (
	"context"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
	"github.com/vishvananda/netlink"

	flannel "github.com/flannelkit/flannel"
	"github.com/flannelkit/flannel/backend"
	"github.com/flannelkit/flannel/extension"
	"github.com/flannelkit/flannel/internal/backendtest"
	"github.com/flannelkit/flannel/internal/nlsafe"
	"github.com/flannelkit/flannel/internal/testenv"
	"github.com/flannelkit/flannel/lease"
)

// contractProto marks the routes the fixture's commands program.
const contractProto = 201

// TestContract runs the dataplane contract suite, dual-stack, with
// commands that program host-gw-style routes (marked with protocol 201)
// through a script, and a state directory per node.
//
// An extension Network cannot repair what its commands did: nothing tells
// it that a route a command added is gone, and it runs a peer's command
// again only when the peer changes (or its command failed). So the
// fixture's one Damage deletes nothing, and the suite's repair cases check
// only what still applies (Run on an applied Network, the pods reaching
// each other, every goroutine joined, no command before the first Apply
// after a restart). Its case without a namespace is skipped: the commands
// run in the node's namespace and Prepare refuses to run without one, and
// the routes another Network's commands added for a peer not in the set
// are not this Network's to remove.
func TestContract(t *testing.T) {
	testenv.RequireRoot(t)
	dir := t.TempDir()
	add := script(t, dir, "add.sh", `set -e
if [ -n "$SUBNET" ]; then ip route replace "$SUBNET" via "$PUBLIC_IP" dev eth0 proto 201; fi
if [ -n "$IPV6SUBNET" ]; then ip -6 route replace "$IPV6SUBNET" via "$PUBLIC_IPV6" dev eth0 proto 201; fi`)
	remove := script(t, dir, "remove.sh", `set -e
if [ -n "$SUBNET" ]; then ip route del "$SUBNET" dev eth0 proto 201; fi
if [ -n "$IPV6SUBNET" ]; then ip -6 route del "$IPV6SUBNET" dev eth0 proto 201; fi`)
	opts := extension.Options{
		Commands: extension.Commands{SubnetAdd: add, SubnetRemove: remove},
		// A failing peer is retried long after the suite's checks, so its
		// backoff warnings stay out of them.
		RetryMin: time.Minute, RetryMax: time.Minute,
	}
	backendtest.Run(t, backendtest.Fixture{
		Type: extension.Type,
		New: func(t *testing.T, repair time.Duration) flannel.Backend {
			if strings.HasSuffix(t.Name(), "/RunRepairsWithoutNamespace") {
				t.Skip("extension runs its commands in the node's namespace, and routes another Network's commands added are not its to remove (see TestContract)")
			}
			o := opts
			o.RepairInterval = repair
			return &perNode{t: t, dir: dir, opts: o}
		},
		Dump: dumpProto,
		Damage: []backendtest.Damage{{
			Name: "none (an extension Network cannot know that its commands' work is gone)",
			Do:   func(*testing.T, *backendtest.Node, *backendtest.Node) {},
		}},
	})
}

// perNode is an extension Backend as a node's agent makes it: its state
// directory is the node's (found by its namespace's name), so that a
// restarted Network knows the peers its predecessor added.
type perNode struct {
	t    *testing.T
	dir  string
	opts extension.Options

	mu sync.Mutex
	b  *extension.Backend
}

var _ flannel.Backend = (*perNode)(nil)

func (p *perNode) Type() string { return extension.Type }

func (p *perNode) backend(env flannel.Env) *extension.Backend {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.b == nil {
		o := p.opts
		o.StateDir = filepath.Join(p.dir, "state", backendtest.NodeName(p.t, env.NS))
		p.b = extension.New(o)
	}
	return p.b
}

func (p *perNode) Prepare(ctx context.Context, env flannel.Env) (lease.Attrs, error) {
	return p.backend(env).Prepare(ctx, env)
}

func (p *perNode) Start(ctx context.Context, own lease.Lease) (flannel.Network, error) {
	p.mu.Lock()
	b := p.b
	p.mu.Unlock()
	require.NotNil(p.t, b, "Start before Prepare")
	return b.Start(ctx, own)
}

func (p *perNode) Cleanup(ctx context.Context, env flannel.Env) error {
	return p.backend(env).Cleanup(ctx, env)
}

// dumpProto renders the routes with the fixture's protocol on n.
func dumpProto(t *testing.T, n *backendtest.Node) []string {
	t.Helper()
	rs, err := nlsafe.Wrap(n.Node.Handle).RouteListFiltered(netlink.FAMILY_ALL,
		&netlink.Route{Protocol: contractProto}, netlink.RT_FILTER_PROTOCOL)
	require.NoError(t, err)
	var out []string
	for _, r := range rs {
		out = append(out, backend.FormatRoute(r))
	}
	slices.Sort(out)
	return out
}
