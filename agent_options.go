package flannel

import (
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"github.com/flannelkit/flannel/lease"
)

// Default retry bounds for AgentOptions.RetryMin and RetryMax.
const (
	DefaultRetryMin = 500 * time.Millisecond
	DefaultRetryMax = 30 * time.Second
)

// ErrAgentRunning is returned by Run and Cleanup while Run is executing.
var ErrAgentRunning = errors.New("agent is already running")

// ErrSubnetChanged is matched (errors.Is) by a *SubnetChangedError.
var ErrSubnetChanged = errors.New("node subnet changed")

// SubnetChangedError is returned by Agent.Run when the node lost its lease
// and the store could only give it different subnets. The agent does not
// reprogram the node by itself: pods hold addresses of the Old subnets, so
// the embedder must move them (typically: drain and restart the node agent,
// whose next Run reclaims New). It matches ErrSubnetChanged and
// lease.ErrLeaseLost with errors.Is.
type SubnetChangedError struct {
	Old, New lease.Lease
}

func (e *SubnetChangedError) Error() string {
	return fmt.Sprintf("lease %s lost and re-acquired as %s: pods on this node must move", e.Old, e.New)
}

// Is reports whether target is ErrSubnetChanged.
func (e *SubnetChangedError) Is(target error) bool { return target == ErrSubnetChanged }

// Unwrap returns lease.ErrLeaseLost: the change follows a lost lease.
func (e *SubnetChangedError) Unwrap() error { return lease.ErrLeaseLost }

// AgentOptions configure an Agent.
type AgentOptions struct {
	// Store is where the node's lease is published and peers are found.
	// Required.
	Store LeaseStore
	// Backend programs the node's kernel. Required.
	Backend Backend
	// Iface is the node's external interface (backend.FindInterface).
	// Required: Name must be set. Its PublicIP/PublicIPv6 are published
	// when the backend does not set them.
	Iface ExternalInterface
	// Handle is a netlink handle bound to the node's network namespace,
	// passed to the backend. Required.
	Handle *netlink.Handle
	// NS is the node's network namespace, for sysctls. Optional.
	NS netns.NsHandle
	// Logger receives the agent's and the backend's logs. Optional: nil
	// discards.
	Logger *slog.Logger
	// SubnetFile is where subnet.env is written for the CNI plugin (e.g.
	// /run/flannel/subnet.env), and where the previous subnet is read from
	// on start. Optional: empty means no file.
	SubnetFile string
	// IPMasq is written to subnet.env as FLANNEL_IPMASQ. Optional.
	IPMasq bool
	// OnReady is called once per Run, after Ready's channel is closed, with
	// the state at that moment. It must not block for long. Optional.
	OnReady func(State)
	// RetryMin and RetryMax bound the capped, jittered exponential backoff
	// used to retry failed Apply, Watch and Keep calls. Optional: defaults
	// DefaultRetryMin and DefaultRetryMax.
	RetryMin, RetryMax time.Duration
	// Rules keeps the node's masquerade and forward rules: ensured after
	// subnet.env is written and before the agent is ready (a failure ends
	// Run), run alongside the network, removed by Cleanup. Optional: nil
	// means the agent touches no netfilter rule.
	Rules TrafficRules
	// OnApply is called after every Apply of the peers with the number of
	// peers, how long Apply took and its error, e.g. for metrics. It must
	// not block. Optional.
	OnApply func(peers int, took time.Duration, err error)
	// OnWatchRestart is called when the store's Watch returned an error
	// and is about to be restarted. It must not block. Optional.
	OnWatchRestart func(err error)
	// OnKeepError is called when keeping the lease failed; err wraps
	// lease.ErrLeaseLost when the lease was lost. It must not block.
	// Optional.
	OnKeepError func(err error)
}

// State is a point-in-time view of an Agent.
type State struct {
	// Lease is the node's current lease; zero before the first one.
	Lease lease.Lease
	// MTU is the MTU pods on this node should use; 0 before Start.
	MTU int
	// Peers is the number of peers in the last set applied to the kernel.
	Peers int
	// Ready is true while Run is running and has become ready.
	Ready bool
	// ApplyingSince is when the Apply now running began; zero when none
	// runs. An Apply that has run for long (minutes) is wedged: a health
	// check can report it (examples/flanneld's /healthz does).
	ApplyingSince time.Time
}
